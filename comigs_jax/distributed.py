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
    return int(np.max(multihost_utils.process_allgather(np.int64(value))))
