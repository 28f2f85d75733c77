"""Several JAX processes, one per host (as on a TPU pod or a GPU cluster): start-up and helpers.

`initialize(cfg.distributed)` must run before any JAX computation. A multi-process launch is
detected from explicit config values, from the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID environment (what experiments.launch_local sets), or from a cluster JAX detects
itself (SLURM, Open MPI, a multi-host Cloud TPU slice); a single process changes nothing.
"""
from __future__ import annotations

import os

import jax
import numpy as np

MODES = ("auto", "always", "never")


def _env_int(name: str, default: int | None = None) -> int | None:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else default


def launch_detected(d) -> bool:
    """Whether this process is one of several (config, our environment, or a known cluster)."""
    if d.mode == "never":
        return False
    if d.mode == "always" or d.num_processes > 1 or d.coordinator_address:
        return True
    if os.environ.get("JAX_COORDINATOR_ADDRESS") and (_env_int("JAX_NUM_PROCESSES", 1) or 1) > 1:
        return True
    return ((_env_int("SLURM_NTASKS", 1) or 1) > 1 or (_env_int("OMPI_COMM_WORLD_SIZE", 1) or 1) > 1
            or "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""))


def initialize(d) -> bool:
    """jax.distributed.initialize() for a multi-process launch; returns whether it ran.

    Explicit config values win over the environment; what neither gives, JAX's own cluster
    detection fills in. On CPU, processes talk through the gloo collectives.
    """
    if d.mode not in MODES:
        raise ValueError(f"distributed.mode={d.mode!r}: allowed {MODES}")
    if not launch_detected(d):
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    address = d.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    n = d.num_processes if d.num_processes > 0 else _env_int("JAX_NUM_PROCESSES")
    pid = d.process_id if d.process_id >= 0 else _env_int("JAX_PROCESS_ID")
    if address:
        kwargs["coordinator_address"] = address
    if n is not None:
        kwargs["num_processes"] = n
    if pid is not None:
        kwargs["process_id"] = pid
    jax.distributed.initialize(**kwargs)
    return True


def exit_failed(exc: BaseException) -> None:
    """End this process of a multi-process run now, after reporting `exc` on stderr.

    A normal exit would wait in jax.distributed's shutdown barrier for processes that are
    themselves waiting in a collective for this one: the run would hang instead of failing.
    Exiting at once closes this process's connections, so the others' collectives fail too."""
    import sys
    import traceback
    if isinstance(exc, SystemExit):
        code = exc.code if isinstance(exc.code, int) else 1
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    else:
        code = 130 if isinstance(exc, KeyboardInterrupt) else 1
        traceback.print_exception(exc)
    print(f"process {jax.process_index()} of {jax.process_count()} failed; exiting without waiting for "
          "the others", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_or_exit(fn, multi: bool, clean: tuple = ()):
    """fn(); on one process of several, an exception or a non-zero exit escaping it ends this
    process at once (exit_failed), so the others fail instead of hanging. `clean`: exceptions
    that every process raises together (an agreed stop), which exit normally."""
    if not multi:
        return fn()
    try:
        return fn()
    except clean:
        raise
    except BaseException as e:  # noqa: BLE001 - one failing process must not leave the others waiting
        if isinstance(e, SystemExit) and e.code in (None, 0):
            raise
        exit_failed(e)


def barrier(name: str) -> None:
    """Wait until every process reaches barrier `name` (a no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def is_main_process() -> bool:
    return jax.process_index() == 0


def to_host(x) -> np.ndarray:
    """A (possibly multi-process) jax array as a full numpy array on every process."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def global_max(value: int) -> int:
    """The maximum of an integer over all processes."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils
    return int(np.max(multihost_utils.process_allgather(np.array([value], np.int32))))


def global_result_type(dtypes, default=np.int32) -> np.dtype:
    """np.result_type of every process's `dtypes` (a process may have none: it then learns the
    others'); `default` when no process has any."""
    names = sorted({np.dtype(d).name for d in dtypes})
    if jax.process_count() > 1:
        names = sorted({n for part in gather_json(names) for n in part})
    return np.result_type(*names) if names else np.dtype(default)


def gather_json(obj) -> list:
    """Every process's JSON-able `obj`, in process order, on every process."""
    import json
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils
    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    buf = np.zeros(global_max(len(raw)), np.uint8)
    buf[: len(raw)] = raw
    rows = np.asarray(multihost_utils.process_allgather(buf))
    return [json.loads(bytes(r).rstrip(b"\0").decode()) for r in rows]


def global_user_view(data, n_users: int):
    """`data` (comigs_jax.data.UserData of this process's users) with the per-user metadata of
    ALL users (names, token counts, Bayes floors, ...) gathered from every process; the token
    arrays and `indices` stay this process's own. Process 0 reports from it."""
    import dataclasses
    if jax.process_count() == 1:
        return data
    n_local = len(data.indices)
    per_user = {k: v for k, v in data.info.items() if isinstance(v, list) and len(v) == n_local}
    per_user["tokens"] = data.info.get("tokens") or [
        {"train": len(a), "valid": len(b), "test": len(c)} for a, b, c in zip(data.train, data.valid, data.test)]
    parts = gather_json({"indices": list(map(int, data.indices)), "users": list(data.users),
                         "per_user": {k: [_jsonable(x) for x in v] for k, v in per_user.items()}})
    users = [None] * n_users
    merged = {k: [None] * n_users for k in per_user}
    for part in parts:
        for j, i in enumerate(part["indices"]):
            users[i] = part["users"][j]
            for k in merged:
                merged[k][i] = part["per_user"][k][j]
    return dataclasses.replace(data, users=users, info={**data.info, **merged})


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return x
