r"""vmap versus loop: what simulating users as an array axis buys, against the machine's own peak.

    python -m experiments.bench [--config=configs/bench.py[:gpu]] [--config.users=1,4,16,64,256] ...

The command line is experiments.run's (comigs_jax.cli: `--config=FILE[:ARG]`, `--config.key=value`,
an unknown key or a bad value is one `error: ...` line and exit code 1); `main(argv)` returns the
exit code, so tests call it in-process. Each workload's engine configs are built from the keys
experiments.run and comigs_jax.capacity share (`base`, `vocab_size`, the `model` and `train`
groups) by the same function, comigs_jax.configuration.engine_configs.

For each model size and user count U, in one process, four ways to run the same federated round
(comigs_jax.train.rounds; all start from the same states and must give the same losses):

- loop_step:    Python loop over users, one jitted per-user training step per call (the reference)
- loop_round:   Python loop over users, one jitted per-user round (lax.scan over local steps)
- vmap:         all users in one jitted round (jit(vmap(scan)))
- vmap_sharded: the same with users split over a `users` mesh axis over the devices

Measured per mode: compile time (the vmapped modes: lowering + XLA compilation, timed ahead of the
first round; the loops: first round minus the steady-state round), steady-state wall
time per round (median of repeated rounds after warm-up, block_until_ready), training tokens/s
over all users, speedups, peak host RSS while the mode ran, device memory where the backend
reports it, and achieved FLOP/s as a fraction of the peak of a large matmul of the same dtype
timed in the same run.

FLOP convention: the capacity model's (comigs_jax.capacity.round_flops, one count for the
project): a [m, k] x [k, n] matmul is 2mkn FLOPs; forward matmuls, the input gradients on the
path to a trainable leaf and the trainable leaves' weight gradients, per user, times the expert
and router steps of a round, times U; elementwise ops, softmax, LayerNorm and the optimizer are
not counted.

The vmapped modes place their inputs through a Layout (comigs_jax.federated.layout: its `users`
and `replicated` shardings, and `chunk`), the one the training loop uses, and run
vmap_round(..., user_chunk=layout.model_chunk): `--config.user_chunk=C` runs each device's users
C at a time (0 = all at once). A chunk that does not divide a device's users pads them to whole
chunks: padding rows (copies of user 0, inactive) are computed but never reported nor counted as
work (tokens/s and FLOPs are the real users'). `--config.remat` is every workload's model.remat.

Sweep (`--config.sweep=True`): per model, U doubles from its first listed U; before a U starts, its
bytes are predicted (the larger of comigs_jax.capacity.device_bytes for the mode's layout, plus on
CPU the process's resident set at the start, and the extrapolated peak measured at the previous
U's) and the sweep stops if they exceed sweep_fraction of RAM (CPU) or of the device's memory;
it also stops at a U that runs out of memory or passes sweep_max_users. It reports the largest U
that completed a round, with its round time.

On CPU this module asks XLA for 8 fake host devices (XLA_FLAGS=--xla_force_host_platform_device_count=8,
set before jax is imported, unless XLA_FLAGS already sets a count) so that vmap_sharded has a
mesh to shard over; the flag only affects the CPU platform. The fake devices share the same cores.

Several processes (the hosts of a pod; `experiments.launch_local` on one machine): the module
calls jax.distributed.initialize() at start-up (cfg.distributed, as experiments.run) and then runs
only vmap_sharded, over the global mesh of every process's devices; the other modes are
single-device baselines and are skipped. A U that does not divide the global device count is
skipped. Every process builds the same synthetic workload from the seed; process 0 alone prints
and writes the results. The % of peak is then against the sum of the processes' measured peaks
(CPU) or one device's peak x the devices (accelerators); the output says which.

Writes {out_dir}/bench.json and {out_dir}/bench.md (the table) and prints the table.
"""
from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import dataclasses
import json
import math
import platform
import resource
import statistics
import sys
import threading
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from ml_collections import ConfigDict

from comigs_jax import capacity, cli, configuration, distributed
from configs.bench import WORKLOADS
from comigs_jax.errors import ConfigError
from comigs_jax.experiment.provenance import provenance
from comigs_jax.federated.layout import Layout
from comigs_jax.federated.roles import split_base
from comigs_jax.federated.sharding import single_device_mesh, users_mesh
from comigs_jax.federated.users import stack_tokens
from comigs_jax.model.config import REMAT
from comigs_jax.model.lm import ModelConfig, init_params
from comigs_jax.train.rounds import loop_round, loop_step_round, vmap_round
from comigs_jax.train.state import TrainConfig, init_states

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(_REPO, "configs", "bench.py")
# Where the keys of configs/bench.py's groups are defined (unknown-key messages): the workloads'
# model and train groups are configs/base.py's, without model.dtype (the bench's `dtype`).
HOMES = {"": "configs/bench.py", "distributed": "configs/base.py"}

MODES = ("loop_step", "loop_round", "vmap", "vmap_sharded")
LOOP_MODES = ("loop_step", "loop_round")
FLOP_CONVENTION = ("1 multiply-add = 2 FLOPs; round FLOPs = comigs_jax.capacity.round_flops (matmuls only: "
                   "forward, input gradients on the path to a trainable leaf, trainable weight gradients) "
                   "of the per-user expert and router steps x steps per round x U; peak = median "
                   "n x n x n matmul (2n^3 FLOPs) in the model dtype, same process")


def _ints(s) -> list[int]:
    if isinstance(s, int):
        return [s]
    return [int(x) for x in str(s).replace("(", "").replace(")", "").split(",") if x.strip()]


def _names(s) -> list[str]:
    return [x.strip() for x in str(s).split(",") if x.strip()]


# ----------------------------------------------------------------------------- machine

def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the process peak so far
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakRSS:
    """Samples the process's resident set size in a thread; .peak is the largest seen."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak = interval, _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _device_peak_bytes() -> int | None:
    stats = jax.local_devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def machine_info(argv=None) -> dict:
    """The machine, the versions and the command (`argv`, default sys.argv)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = float("nan")
    prov = provenance()
    return {"date": prov["date"], "host": platform.node(), "cpu": cpu, "cpu_cores": os.cpu_count(),
            "host_memory_gib": round(mem, 1), "backend": prov["backend"], "device_kind": prov["device_kind"],
            "device_count": prov["device_count"], "process_count": prov["process_count"],
            "local_device_count": prov["local_device_count"], "jax": prov["versions"]["jax"],
            "python": prov["versions"]["python"], "versions": prov["versions"], "git": prov["git"],
            "command": " ".join(["python -m experiments.bench"] + list(sys.argv if argv is None else argv)[1:])}


def peak_matmul_flops(n: int, dtype: str, repeats: int = 5) -> dict:
    """Median FLOP/s of an n x n x n matmul (2 n^3 FLOPs) in `dtype` on the default device."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    inner = 1 if jax.default_backend() == "cpu" else 20  # amortise launch overhead on accelerators
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            out = f(a, b)
        out.block_until_ready()
        times.append((time.perf_counter() - t) / inner)
    sec = statistics.median(times)
    return {"n": n, "dtype": dtype, "seconds": sec, "flops_per_s": 2 * n**3 / sec}


def peak_all_processes(n: int, dtype: str) -> list[dict]:
    """peak_matmul_flops on one local device of every process, measured at the same time (after a
    barrier: processes sharing a machine share its cores), in process order."""
    distributed.barrier("bench peak matmul")
    return distributed.gather_json(peak_matmul_flops(n, dtype))


def peak_reference(peaks: list[float], backend: str, devices: int) -> tuple[float, str]:
    """(FLOP/s, its description) that a mode run on `devices` devices is measured against; `peaks`
    are the processes' one-device matmul peaks. CPU: one device's matmul already uses all the
    cores of its process (fake devices share them), so the reference is the sum over processes.
    Accelerators: one device's peak x the devices the mode ran on."""
    if backend == "cpu":
        if len(peaks) == 1:
            return peaks[0], "one device's matmul peak (CPU: the fake devices share its cores)"
        return sum(peaks), (f"the sum of the {len(peaks)} processes' one-device matmul peaks (CPU: a process's "
                            "fake devices share its cores; processes on one machine share it too)")
    ref = statistics.mean(peaks)
    return ref * devices, f"one device's matmul peak x {devices} device{'s' if devices > 1 else ''}"


# ----------------------------------------------------------------------------- workload

@dataclasses.dataclass
class Workload:
    """One model size at one U: everything a mode needs, built once and shared by all modes.
    `chunk`: train.user_chunk of the vmapped modes (0 = all of a device's users at once)."""

    name: str
    model_cfg: ModelConfig
    tc: TrainConfig
    method: object
    steps: int
    n_users: int
    base: dict
    states0: object
    data: dict
    masks: jax.Array
    active: jax.Array
    chunk: int = 0

    @property
    def tokens_per_round(self) -> int:
        """Training tokens of the expert steps of all users (router steps not counted; nor padding rows)."""
        return self.n_users * self.steps * self.tc.batch_size * self.tc.seq_len


def workload_configs(name: str, mc: ConfigDict, method_name: str, dtype: str, remat: str = "none"
                     ) -> tuple[ModelConfig, TrainConfig, object]:
    """(model config, train config, method) of workload `name` of configs/bench.py in `dtype`
    with `remat` (the bench's model.remat), through comigs_jax.configuration.engine_configs (as
    comigs_jax.capacity builds them). ConfigError (one line, the key as `config.<name>.<key>`)
    for a value that is not allowed. vocab_size 0 is the named base's own (configuration.base_shape)."""
    wc = ConfigDict(mc.to_dict())
    wc.model.dtype = dtype
    wc.model.remat = remat
    try:
        model_cfg, tc, method = configuration.engine_configs(wc, method_name)
        if tc.local_steps % tc.router_every:
            raise ConfigError(f"config.train.local_steps={tc.local_steps} is not allowed: a multiple of "
                              f"train.router_every={tc.router_every} (every round the same router phases)")
    except ConfigError as e:  # the workload's keys live under config.<name>
        raise ConfigError(str(e).replace("config.", f"config.{name}.", 1)) from None
    return model_cfg, tc, method


def build_workload(name: str, mc: ConfigDict, n_users: int, method_name: str, dtype: str, seed: int,
                   base: dict | None = None, remat: str = "none", chunk: int = 0) -> Workload:
    cfg, tc, method = workload_configs(name, mc, method_name, dtype, remat)
    if base is None:
        base = split_base(init_params(cfg.base, jax.random.key(seed)))[0]
    rng = np.random.default_rng(seed)
    tok = np.uint16 if cfg.vocab_size <= 2**16 else np.int32
    train = [rng.integers(0, cfg.vocab_size, mc.train_tokens).astype(tok) for _ in range(n_users)]
    valid = [rng.integers(0, cfg.vocab_size, mc.valid_tokens).astype(tok) for _ in range(n_users)]
    (tr, tr_len), (va, va_len) = stack_tokens(train), stack_tokens(valid)
    del train, valid
    data = jax.device_put({"train": tr, "train_len": tr_len, "valid": va, "valid_len": va_len})
    states0 = init_states(cfg, tc, method, jax.random.PRNGKey(seed), n_users, cfg.moe.n_specialists)
    return Workload(name, cfg, tc, method, tc.local_steps, n_users, base, states0, data,
                    jnp.ones((n_users, cfg.moe.n_experts), bool), jnp.ones((n_users,), bool), chunk)


def workload_flops(w: Workload) -> dict:
    """FLOPs of one round of all users: U x comigs_jax.capacity.round_flops (the one count; padding
    rows are not work)."""
    f = capacity.round_flops(w.model_cfg, w.tc, w.method, w.steps)
    return {"expert_step": f["expert_step"], "router_step": f["router_step"], "round": w.n_users * f["per_user"]}


def mode_layout(mode: str, n_users: int, chunk: int = 0) -> Layout | None:
    """The Layout a vmapped mode runs its users on (None for the loop modes): `vmap` one device,
    `vmap_sharded` gcd(U, devices) devices of one process (so that the devices add no padding
    users) or every process's devices; both with train.user_chunk `chunk`, which pads each
    device's users to whole chunks."""
    if mode in LOOP_MODES:
        return None
    if mode == "vmap":  # one device: a one-device mesh splits nothing
        return Layout(n_users, single_device_mesh(), chunk=chunk)
    if mode == "vmap_sharded":
        # Several processes: every process's devices (run_benchmark skips a U they do not divide).
        n_dev = jax.device_count() if jax.process_count() > 1 else math.gcd(n_users, jax.device_count())
        return Layout(n_users, users_mesh(jax.devices()[:n_dev]), chunk=chunk)
    raise ValueError(f"mode={mode!r}: allowed {MODES}")


def build_mode(mode: str, w: Workload, consume: bool = False) -> tuple[Callable, dict, dict]:
    """(round_fn, placed inputs, info) for one mode; round_fn(base, states, data, masks, active).
    The vmapped modes run through the mode's Layout and vmap_round(..., user_chunk=): padding rows
    (users padded to whole chunks) train on copies of user 0's state and data but are inactive and
    dropped from every result. consume: the mode takes w.states0 itself instead of a copy (the
    last mode of a U: no second copy of every user's state)."""
    args = (w.model_cfg, w.tc, w.method, w.steps)
    states = w.states0 if consume else jax.tree.map(jnp.copy, w.states0)  # vmap donates its states
    if consume:
        w.states0 = None
    inputs = dict(base=w.base, states=states, data=w.data, masks=w.masks, active=w.active)
    info = {"devices": 1, "chunk": None, "padding_rows": 0}
    if mode == "loop_step":
        return loop_step_round(*args), inputs, info
    if mode == "loop_round":
        return loop_round(*args), inputs, info
    layout = mode_layout(mode, w.n_users, w.chunk)
    info.update(devices=layout.n_devices, chunk=layout.model_chunk, padding_rows=layout.n_padding)
    fn = vmap_round(*args, mesh=layout.mesh, user_chunk=layout.model_chunk)
    return fn, place(layout, pad_rows(inputs, layout.n_rows)), info


def pad_rows(inputs: dict, n_rows: int) -> dict:
    """The round's inputs with the user axis padded to n_rows: padding rows repeat row 0 (state,
    data, masks) and are inactive, so they change nothing and are never reported."""
    n = inputs["masks"].shape[0]
    if n_rows == n:
        return inputs
    pad = lambda x: jnp.concatenate([x, jnp.broadcast_to(x[:1], (n_rows - n, *x.shape[1:]))])
    out = {k: v if k == "base" else jax.tree.map(pad, v) for k, v in inputs.items()}
    out["active"] = jnp.concatenate([inputs["active"], jnp.zeros((n_rows - n,), bool)])
    return out


def place(layout: Layout, inputs: dict) -> dict:
    """The round's inputs on the layout's mesh: the base replicated, the rest split over `users`
    (the layout's shardings, as the training loop places them); the user axis must be the
    layout's rows (pad_rows)."""
    n = inputs["masks"].shape[0]
    if layout.n_rows != n:
        raise ValueError(f"{n} rows for a layout of {layout.n_rows} ({layout.n_users} users, {layout.n_padding} padding)")
    # Several processes: the same host values on every process (built from the seed); device_put
    # places each process's shards of the global arrays.
    host = jax.device_get if jax.process_count() > 1 else (lambda x: x)
    return {k: jax.device_put(host(v), layout.replicated if k == "base" else layout.users) for k, v in inputs.items()}


def _program_memory(compiled) -> dict | None:
    """Argument/output/temporary bytes of a compiled round program."""
    try:
        mem = compiled.memory_analysis()
    except Exception:  # not every backend gives it
        return None
    if mem is None:
        return None
    return {k: int(getattr(mem, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                              "temp_size_in_bytes", "alias_size_in_bytes")}


def time_mode(mode: str, w: Workload, cfg: ConfigDict, consume: bool = False) -> dict:
    fn, inputs, info = build_mode(mode, w, consume)
    block = jax.block_until_ready
    program, compile_s = None, None
    with PeakRSS() as rss:
        states = inputs.pop("states")
        base, data, masks, active = (inputs[k] for k in ("base", "data", "masks", "active"))
        if hasattr(fn, "lower"):  # the vmapped modes: compiled ahead of time, timed exactly
            t = time.perf_counter()
            fn = fn.lower(base, states, data, masks, active).compile()
            compile_s = time.perf_counter() - t
            program = _program_memory(fn)
        t = time.perf_counter()
        states, metrics = block(fn(base, states, data, masks, active))
        first = time.perf_counter() - t
        first_loss = distributed.to_host(metrics["loss"])[:w.n_users].astype(np.float64)  # no padding rows
        for _ in range(cfg.warmup):
            states, metrics = block(fn(base, states, data, masks, active))
        times = []
        while len(times) < cfg.repeats:
            t = time.perf_counter()
            states, metrics = block(fn(base, states, data, masks, active))
            times.append(time.perf_counter() - t)
            if len(times) >= cfg.min_repeats and _agree(sum(times) > cfg.max_seconds):
                break
        del states, metrics
    if jax.process_count() > 1:  # a round lasts until the slowest process has it
        times = list(np.max(distributed.gather_json(times), axis=0))
        first = max(distributed.gather_json(first))
        if compile_s is not None:
            compile_s = max(distributed.gather_json(compile_s))
    sec = statistics.median(times)
    # Loop modes compile inside their first round: compile time = first round - steady round.
    compile_s = max(first - sec, 0.0) if compile_s is None else compile_s
    return {**info, "compile_s": compile_s, "first_round_s": first, "round_s": sec,
            "round_s_all": times, "tokens_per_s": w.tokens_per_round / sec, "peak_rss_gib": rss.peak / 2**30,
            "device_peak_gib": None if _device_peak_bytes() is None else _device_peak_bytes() / 2**30,
            "program_memory": program, "first_round_loss": first_loss}


def _agree(flag: bool) -> bool:
    """Process 0's `flag` on every process (each must run the same rounds, or the others wait)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(multihost_utils.broadcast_one_to_all(np.array(flag)))


def _is_oom(e: Exception) -> bool:
    s = str(e)
    return "RESOURCE_EXHAUSTED" in s or "Out of memory" in s or "out of memory" in s


def bench_workload(w: Workload, modes: list[str], cfg: ConfigDict, peaks: list[float]) -> list[dict]:
    rows, ref, flops = [], None, None
    skip = lambda mode: mode in LOOP_MODES and cfg.loop_max_users and w.n_users > cfg.loop_max_users
    last = [m for m in modes if not skip(m)][-1:]  # the last mode that runs takes the initial states
    for mode in modes:
        row = {"model": w.name, "users": w.n_users, "mode": mode, "dtype": w.model_cfg.dtype,
               "user_chunk": w.chunk, "remat": w.model_cfg.remat}
        if skip(mode):
            rows.append({**row, "skipped": f"U > loop_max_users={cfg.loop_max_users}"})
            continue
        logging.info("%s U=%d %s ...", w.name, w.n_users, mode)
        flops = flops or workload_flops(w)  # only for a U that runs
        try:
            r = time_mode(mode, w, cfg, consume=[mode] == last)
        except Exception as e:  # an accelerator running out of memory is a result, not a crash
            if not _is_oom(e):
                raise
            rows.append({**row, "skipped": "out of memory"})
            continue
        loss = r.pop("first_round_loss")
        ref = loss if ref is None else ref
        r["loss_max_abs_diff"] = float(np.max(np.abs(loss - ref)))  # vs the first mode run
        r["losses_agree"] = r["loss_max_abs_diff"] <= cfg.loss_atol
        r["first_round_mean_loss"] = float(loss.mean())
        r["round_flops"] = flops["round"]
        r["flops_per_s"] = flops["round"] / r["round_s"]
        r["peak_reference_flops_per_s"] = peak_reference(peaks, jax.default_backend(), r["devices"])[0]
        r["fraction_of_peak"] = r["flops_per_s"] / r["peak_reference_flops_per_s"]
        rows.append({**row, **r})
        logging.info("  %.4f s/round, %.0f tok/s, %.1f%% of peak, compile %.1f s", r["round_s"], r["tokens_per_s"],
                     100 * r["fraction_of_peak"], r["compile_s"])
    by_mode = {r["mode"]: r for r in rows if "round_s" in r}
    for r in rows:
        if "round_s" not in r:
            continue
        for base_mode in LOOP_MODES:
            b = by_mode.get(base_mode)
            r[f"speedup_vs_{base_mode}"] = None if b is None else b["round_s"] / r["round_s"]
    for r in rows if flops else ():
        r["flops_expert_step"], r["flops_router_step"] = flops["expert_step"], flops["router_step"]
    return rows


# ----------------------------------------------------------------------------- sweep

def memory_limit(fraction: float) -> tuple[float, str]:
    """(bytes, description) the sweep may fill: `fraction` of the host's RAM on CPU (the fake
    devices share it), of one device's memory on accelerators."""
    if jax.default_backend() == "cpu":
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return fraction * total, f"{100 * fraction:.0f}% of {total / 2**30:.1f} GiB RAM"
    stats = jax.local_devices()[0].memory_stats() or {}
    total = stats.get("bytes_limit")
    if not total:
        raise ConfigError("config.sweep=True is not allowed here: the device reports no memory limit")
    return fraction * total, f"{100 * fraction:.0f}% of the device's {total / 2**30:.1f} GiB"


def predicted_bytes(name: str, mc: ConfigDict, cfg: ConfigDict, dtype: str, n_users: int, modes: list[str],
                    baseline: float = 0.0) -> float:
    """What a U would need, from the capacity model (comigs_jax.capacity.device_bytes, the
    backend's activation profile): on CPU the whole process (`baseline` + every device's bytes
    of the largest mode + the workload's initial states, kept beside a mode's copy); on an
    accelerator one device's bytes."""
    model_cfg, tc, method = workload_configs(name, mc, cfg.method, dtype, cfg.remat)
    cpu = jax.default_backend() == "cpu"
    p = capacity.plan(model_cfg, tc, method, n_users, train_tokens=mc.train_tokens, valid_tokens=mc.valid_tokens,
                      token_bytes=2 if model_cfg.vocab_size <= 2**16 else 4, targets=["h100"],
                      profile="cpu" if cpu else "accelerator", user_chunk=cfg.user_chunk)
    pu, shared = p["per_user"], p["shared"]["total"]
    need = []
    for mode in modes:
        layout = mode_layout(mode, n_users, cfg.user_chunk)
        if layout is None:  # a loop: every user's state and tokens, one user's step
            need.append(n_users * (pu["state"] + pu["tokens"]) + pu["step"] + shared)
            continue
        d = capacity.device_bytes(pu, shared, n_users, layout.n_devices, cfg.user_chunk)
        need.append(d["bytes"]["total"] * (layout.n_devices if cpu else 1))
    copies = n_users * pu["state"] if (cpu and len(modes) > 1) else 0
    return baseline + max(need) + copies


def _extrapolate(points: list[tuple[int, float]], n_users: int, baseline: float = 0.0) -> float:
    """Measured bytes at n_users from the last measured points: the line through the last two,
    or, from one, `baseline` (what was resident before any U) plus the rest in proportion to U."""
    if not points:
        return 0.0
    (u1, b1) = points[-1]
    if len(points) == 1:
        return baseline + max(b1 - baseline, 0.0) * n_users / u1
    (u0, b0) = points[-2]
    return b1 + (n_users - u1) * max(b1 - b0, 0.0) / (u1 - u0)


def sweep_model(name: str, mc: ConfigDict, cfg: ConfigDict, modes: list[str], dtype: str,
                peaks: list[float]) -> tuple[list[dict], dict]:
    """Doubles U from the model's first listed U until the next U would not fit (the larger of the
    capacity model's prediction and the extrapolated measurement exceeds memory_limit), a U runs
    out of memory, or U passes cfg.sweep_max_users. Returns (rows, summary): the largest U that
    completed a round, with its round time (fastest mode), and why the sweep stopped."""
    limit, what = memory_limit(cfg.sweep_fraction)
    cpu = jax.default_backend() == "cpu"
    baseline = _rss_bytes() if cpu else 0.0
    u = _ints(_users_of(cfg, name))[0]
    rows, points, best, base, stop = [], [], None, None, ""
    while True:
        if cfg.sweep_max_users and u > cfg.sweep_max_users:
            stop = f"U={u} > sweep_max_users={cfg.sweep_max_users}"
            break
        model = predicted_bytes(name, mc, cfg, dtype, u, modes, baseline)
        pred = max(model, _extrapolate(points, u, baseline))
        if pred > limit:
            stop = f"U={u} would need {pred / 2**30:.1f} GiB > {limit / 2**30:.1f} GiB ({what})"
            break
        _print(f"{name} sweep: U={u}, predicted {pred / 2**30:.2f} GiB of {limit / 2**30:.1f} GiB")
        w = build_workload(name, mc, u, cfg.method, dtype, cfg.seed, base, cfg.remat, cfg.user_chunk)
        base = w.base
        rs = bench_workload(w, modes, cfg, peaks)
        del w
        for r in rs:
            r.update(predicted_bytes=pred, model_bytes=model)
        rows += rs
        ok = [r for r in rs if "round_s" in r]
        if not ok:
            stop = f"U={u} did not complete a round: " + "; ".join(f"{r['mode']} {r['skipped']}" for r in rs)
            break
        fastest = min(ok, key=lambda r: r["round_s"])
        best = {"users": u, "mode": fastest["mode"], "round_s": fastest["round_s"], "chunk": fastest.get("chunk"),
                "tokens_per_s": fastest["tokens_per_s"]}
        measured = max(r["peak_rss_gib"] if cpu else (r["device_peak_gib"] or 0.0) for r in ok) * 2**30
        points.append((u, measured))
        u *= 2
    summary = {"model": name, "largest": best, "stopped": stop, "limit_bytes": limit, "limit": what,
               "measured_bytes": points}
    _print(f"{name} sweep: largest U that completed a round: "
           + (f"{best['users']} ({best['mode']}, {best['round_s']:.3g} s per round)" if best else "none")
           + f"; stopped: {stop}")
    return rows, summary


# ----------------------------------------------------------------------------- report

def _fmt(x, spec):
    return "–" if x is None else format(x, spec)


def markdown_table(rows: list[dict]) -> str:
    head = ("| model | U | mode | dev | chunk | compile s | round s | tokens/s | × loop_step | × loop_round "
            "| GFLOP/s | % peak | peak RSS GiB | dev. mem GiB | loss diff |")
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        if "round_s" not in r:
            lines.append(f"| {r['model']} | {r['users']} | {r['mode']} | | | | | | | | | | | | {r['skipped']} |")
            continue
        chunk = "–" if r.get("chunk") is None else str(r["chunk"] or "all")
        if r.get("padding_rows"):
            chunk += f" (+{r['padding_rows']} pad)"
        lines.append(
            f"| {r['model']} | {r['users']} | {r['mode']} | {r['devices']} | {chunk} | {r['compile_s']:.1f} | {r['round_s']:.4g} "
            f"| {r['tokens_per_s']:,.0f} | {_fmt(r['speedup_vs_loop_step'], '.2f')} "
            f"| {_fmt(r['speedup_vs_loop_round'], '.2f')} | {r['flops_per_s'] / 1e9:,.1f} "
            f"| {100 * r['fraction_of_peak']:.1f} | {r['peak_rss_gib']:.2f} | {_fmt(r['device_peak_gib'], '.2f')} "
            f"| {r['loss_max_abs_diff']:.1e} |")
    return "\n".join(lines)


def check_targets(rows: list[dict], backend: str) -> list[dict]:
    """The issue's targets, as measured here: met, missed (by how much), or not run."""
    get = lambda m, u, mode: next((r for r in rows if r["model"] == m and r["users"] == u and r["mode"] == mode
                                   and "round_s" in r), None)
    ran = [r for r in rows if "round_s" in r]
    bad = [f"{r['model']} U={r['users']} {r['mode']}" for r in ran if not r["losses_agree"]]
    out = [{"target": "all modes give the same first-round losses", "value": "; ".join(bad) or "yes",
            "met": not bad}] if ran else []
    v, s, l = get("tiny", 64, "vmap"), get("tiny", 64, "loop_step"), get("tiny", 64, "loop_round")
    if v and s and l:
        x = v["tokens_per_s"] / s["tokens_per_s"]
        out.append({"target": "tiny U=64: vmap >= 5x loop_step tokens/s", "value": round(x, 2), "met": x >= 5})
        x = v["tokens_per_s"] / l["tokens_per_s"]
        out.append({"target": "tiny U=64: vmap faster than loop_round", "value": round(x, 2), "met": x > 1})
    big = [r for r in rows if r["model"] == "tiny" and r["users"] >= 256 and "round_s" in r]
    if big:
        out.append({"target": "tiny U=256 runs in one process", "value": round(max(r["peak_rss_gib"] for r in big), 2),
                    "unit": "peak RSS GiB", "met": True})
    g = [r for r in rows if r["model"] == "gpt2" and "round_s" in r]
    if g and backend == "cpu":
        best = max(g, key=lambda r: r["fraction_of_peak"])
        out.append({"target": "CPU GPT-2 124M round >= 50% of matmul peak", "value": round(best["fraction_of_peak"], 3),
                    "best": f"U={best['users']} {best['mode']}", "met": best["fraction_of_peak"] >= 0.5})
    if g and backend != "cpu":
        big = [r for r in g if r["users"] >= 64 and r["dtype"] == "bfloat16"]
        if big:
            best = max(big, key=lambda r: r["fraction_of_peak"])
            out.append({"target": "accelerator GPT-2 124M U>=64 bf16 >= 35% of matmul peak",
                        "value": round(best["fraction_of_peak"], 3), "best": f"U={best['users']} {best['mode']}",
                        "met": best["fraction_of_peak"] >= 0.35})
        ok = [r["users"] for r in g if r["mode"].startswith("vmap")]
        if ok:
            out.append({"target": "largest U that ran (vmap)", "value": max(ok), "met": None})
    # The small GPT-2 on the real vocabulary (issue 15) and SmolLM2-135M (a Llama: GQA, SwiGLU
    # experts, tied 49,152-token head; issue 16): the vmapped round against the same run's matmul
    # peak, and against the PyTorch structure (a Python loop over users and steps).
    for model, floor in (("mini", 0.6), ("smollm2", 0.5)):
        for r in [r for r in ran if r["model"] == model and r["mode"].startswith("vmap")]:
            out.append({"target": f"{model} U={r['users']} {r['mode']} >= {floor:.0%} of matmul peak",
                        "value": round(r["fraction_of_peak"], 3), "met": r["fraction_of_peak"] >= floor})
            s = get(model, r["users"], "loop_step")
            if s:
                out.append({"target": f"{model} U={r['users']} {r['mode']} tokens/s / loop_step tokens/s",
                            "value": round(r["tokens_per_s"] / s["tokens_per_s"], 2), "met": None})
    # Many users per device (train.user_chunk): the tiny model at U = 4,096 in one process.
    for mode in ("vmap", "vmap_sharded"):
        big, mid, small = get("tiny", 4096, mode), get("tiny", 256, mode), get("tiny", 64, mode)
        if big:
            out.append({"target": f"tiny U=4096 {mode} completes a round in one process within 24 GiB peak RSS",
                        "value": round(big["peak_rss_gib"], 2), "unit": "peak RSS GiB", "met": big["peak_rss_gib"] <= 24})
        if big and mid:
            x = big["round_s"] / (4096 / 256 * mid["round_s"])
            out.append({"target": f"tiny {mode}: round at U=4096 <= 1.2 x (4096/256) x round at U=256",
                        "value": round(x, 3), "met": x <= 1.2})
        if big and small:
            x = big["compile_s"] / small["compile_s"]
            out.append({"target": f"tiny {mode}: compile at U=4096 <= 1.5 x compile at U=64", "value": round(x, 3),
                        "met": x <= 1.5})
    return out


def _print(msg: str) -> None:
    """Print on process 0 only (the other processes print nothing but errors)."""
    if jax.process_index() == 0:
        print(msg, flush=True)


def _fail(key: str, value, allowed: str):
    raise ConfigError(f"config.{key}={value!r} is not allowed: {allowed}")


def _users_key(model: str) -> str:
    """The key of a workload's U list: the tiny sweep's is top-level `users`, the others' `<model>.users`."""
    return "users" if model == "tiny" else f"{model}.users"


def _users_of(cfg: ConfigDict, model: str) -> str:
    return cfg.users if model == "tiny" else cfg[model].users


def check_config(cfg: ConfigDict) -> None:
    """Every check that needs no device work, before the peak matmul: ConfigError (one line)."""
    bad = set(_names(cfg.modes)) - set(MODES)
    if bad or not _names(cfg.modes):
        _fail("modes", cfg.modes, f"comma-separated, of {', '.join(MODES)}")
    models = _names(cfg.models)
    if not models or set(models) - set(WORKLOADS):
        _fail("models", cfg.models, f"comma-separated, of {', '.join(WORKLOADS)}")
    if cfg.method not in configuration.METHODS:
        _fail("method", cfg.method, f"one of {', '.join(sorted(configuration.METHODS))}")
    if cfg.dtype not in ("", "float32", "bfloat16"):
        _fail("dtype", cfg.dtype, "'' (float32 on CPU, bfloat16 on accelerators) | float32 | bfloat16")
    if cfg.distributed.mode not in distributed.MODES:
        _fail("distributed.mode", cfg.distributed.mode, " | ".join(distributed.MODES))
    if not isinstance(cfg.user_chunk, int) or isinstance(cfg.user_chunk, bool) or cfg.user_chunk < 0:
        _fail("user_chunk", cfg.user_chunk, "an integer >= 0 (0 = all of a device's users at once)")
    if cfg.remat not in REMAT:
        _fail("remat", cfg.remat, " | ".join(REMAT))
    if not isinstance(cfg.sweep, bool):
        _fail("sweep", cfg.sweep, "True | False")
    if not 0 < cfg.sweep_fraction <= 1:
        _fail("sweep_fraction", cfg.sweep_fraction, "in (0, 1]")
    if not isinstance(cfg.sweep_max_users, int) or cfg.sweep_max_users < 0:
        _fail("sweep_max_users", cfg.sweep_max_users, "an integer >= 0 (0 = only memory stops the sweep)")
    for model in models:
        key = _users_key(model)
        try:
            users = _ints(_users_of(cfg, model))
        except ValueError:
            users = []
        if not users or min(users) < 1:
            _fail(key, _users_of(cfg, model), "comma-separated positive integers")
        workload_configs(model, cfg[model], cfg.method, cfg.dtype or "float32", cfg.remat)
        for k in ("train_tokens", "valid_tokens"):
            if cfg[model][k] < cfg[model].train.seq_len + 1:
                _fail(f"{model}.{k}", cfg[model][k], f"at least one window: train.seq_len + 1 = "
                      f"{cfg[model].train.seq_len + 1}")


def run_benchmark(cfg: ConfigDict, argv=None) -> dict:
    """Runs every configured model size, U and mode; writes bench.json and bench.md (process 0);
    returns the results. ConfigError (one line) for a config value that is not allowed. `argv`:
    the command line recorded in bench.json (default sys.argv)."""
    check_config(cfg)
    modes = _names(cfg.modes)
    if jax.process_count() > 1:
        single = [m for m in modes if m != "vmap_sharded"]
        if single:
            _print(f"{jax.process_count()} processes, {jax.device_count()} devices: running vmap_sharded only; "
                   f"{', '.join(single)} skipped (single-device baselines)")
        modes = ["vmap_sharded"]
    backend = jax.default_backend()
    dtype = cfg.dtype or ("float32" if backend == "cpu" else "bfloat16")
    info = machine_info(argv)
    n = cfg.matmul_size or (4096 if backend == "cpu" else 8192)
    peaks = peak_all_processes(n, dtype)
    logging.info("peak matmul %s n=%d: %s GFLOP/s", dtype, n,
                 ", ".join(f"{p['flops_per_s'] / 1e9:.1f}" for p in peaks))
    if cfg.sweep and jax.process_count() > 1:
        _fail("sweep", cfg.sweep, "False with several processes (the sweep fills one process's memory)")
    rows, sweeps = [], []
    t_start = time.perf_counter()
    for model in _names(cfg.models):
        mc = cfg[model]
        if cfg.sweep:
            rs, summary = sweep_model(model, mc, cfg, modes, dtype, [p["flops_per_s"] for p in peaks])
            rows += rs
            sweeps.append(summary)
            continue
        users = _ints(_users_of(cfg, model))
        base = None
        for u in users:
            # (modes is just vmap_sharded) the layout over every process's devices would pad U
            if jax.process_count() > 1 and Layout(u, users_mesh()).n_padding:
                why = f"U={u} does not divide the {jax.device_count()} devices of {jax.process_count()} processes"
                _print(f"{model} U={u} vmap_sharded skipped: {why}")
                rows.append({"model": model, "users": u, "mode": "vmap_sharded", "dtype": dtype, "skipped": why})
                continue
            w = build_workload(model, mc, u, cfg.method, dtype, cfg.seed, base, cfg.remat, cfg.user_chunk)
            base = w.base  # the frozen base does not depend on U
            rows += bench_workload(w, modes, cfg, [p["flops_per_s"] for p in peaks])
            del w
    # The machine's limit is the better of two measurements, at the start and at the end: a
    # shared or throttled CPU can be slow at either (the fractions use this best peak).
    peaks_end = peak_all_processes(n, dtype)
    total = lambda ps: sum(p["flops_per_s"] for p in ps)
    best = max(peaks, peaks_end, key=total)
    per_process = [p["flops_per_s"] for p in best]
    for r in rows:
        if "flops_per_s" in r:
            r["peak_reference_flops_per_s"] = peak_reference(per_process, backend, r["devices"])[0]
            r["fraction_of_peak"] = r["flops_per_s"] / r["peak_reference_flops_per_s"]
    ran = [1] if backend == "cpu" else sorted({r["devices"] for r in rows if "devices" in r}) or [1]
    peak = {**best[0], "start_flops_per_s": peaks[0]["flops_per_s"], "end_flops_per_s": peaks_end[0]["flops_per_s"],
            "per_process_flops_per_s": per_process,
            "fraction_against": "; ".join(peak_reference(per_process, backend, d)[1] for d in ran)}
    info["bench_seconds"] = round(time.perf_counter() - t_start, 1)
    result = {"machine": info, "config": cfg.to_dict(), "dtype": dtype, "peak_matmul": peak,
              "flop_convention": FLOP_CONVENTION, "rows": rows, "sweeps": sweeps,
              "targets": check_targets(rows, backend)}
    result["markdown"] = report_markdown(result)
    if jax.process_index() != 0:
        return result
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, "bench.json"), "w") as f:
        json.dump({k: v for k, v in result.items() if k != "markdown"}, f, indent=1, default=float)
    with open(os.path.join(cfg.out_dir, "bench.md"), "w") as f:
        f.write(result["markdown"])
    return result


def report_markdown(result: dict) -> str:
    m, p = result["machine"], result["peak_matmul"]
    n_proc = m.get("process_count", 1)
    procs = "" if n_proc == 1 else f" over {n_proc} processes"
    if n_proc == 1:
        measured = f"{p['flops_per_s'] / 1e9:,.1f} GFLOP/s"
    else:
        measured = ("one device per process, " + ", ".join(f"{x / 1e9:,.1f}" for x in p["per_process_flops_per_s"])
                    + " GFLOP/s")
    lines = [f"{m['date']} · {m['cpu']} ({m['cpu_cores']} cores, {m['host_memory_gib']} GiB) · "
             f"backend {m['backend']} ({m['device_count']} × {m['device_kind']}{procs}) · jax {m['jax']} · git {m['git']}",
             f"`{m['command']}`", "",
             f"Peak: {p['n']}×{p['n']}×{p['n']} {p['dtype']} matmul, {measured} "
             f"(process 0: best of {p['start_flops_per_s'] / 1e9:,.1f} at the start and "
             f"{p['end_flops_per_s'] / 1e9:,.1f} at the end; benchmark {m['bench_seconds']:.0f} s). "
             f"% peak is against {p['fraction_against']}. FLOPs: {result['flop_convention']}.",
             f"model.remat {result['config']['remat']!r}; train.user_chunk {result['config']['user_chunk']} in the "
             f"vmapped modes (chunk column: users per chunk on each device, 'all' = all at once, padding rows "
             f"masked and not counted as work).", "",
             markdown_table(result["rows"]), ""]
    for sw in result.get("sweeps", []):
        b = sw["largest"]
        largest = (f"U = {b['users']:,} ({b['mode']}, chunk {b['chunk']}, {b['round_s']:.4g} s per round, "
                   f"{b['tokens_per_s']:,.0f} tokens/s)") if b else "none"
        lines.append(f"- sweep {sw['model']}: largest U that completed a round: {largest}; stopped: {sw['stopped']}")
    for t in result["targets"]:
        state = {True: "met", False: "MISSED", None: "info"}[t["met"]]
        extra = "".join(f", {k} {t[k]}" for k in ("unit", "best") if k in t)
        lines.append(f"- {t['target']}: {t['value']}{extra} — {state}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """The command line `python -m experiments.bench [--config=FILE[:ARG]] [--config.key=value ...]`
    (argv[0] is the program); its exit code. Errors are one `error: ...` line on stderr."""
    argv = list(sys.argv if argv is None else argv)

    def body():
        cfg, _ = cli.parse_config(argv, DEFAULT_CONFIG, homes=HOMES, doc=__doc__)
        check_config(cfg)  # before the distributed start-up and any JAX work
        logging.set_verbosity(logging.WARNING)  # INFO on process 0 once it is known (bench_main)
        multi = distributed.initialize(cfg.distributed)  # before any JAX computation; no-op for one process
        return distributed.run_or_exit(lambda: cli.as_exit(lambda: bench_main(cfg, argv)), multi)

    return cli.main_guard(body)


def bench_main(cfg: ConfigDict, argv=None) -> None:
    # the other processes of a multi-process run print nothing but errors
    logging.set_verbosity(logging.INFO if jax.process_index() == 0 else logging.WARNING)
    t = time.perf_counter()
    result = run_benchmark(cfg, argv)
    _print(result["markdown"])
    _print(f"total {time.perf_counter() - t:.0f} s; wrote {os.path.join(cfg.out_dir, 'bench.json')}")


if __name__ == "__main__":
    cli.install_process_hooks()
    sys.exit(main())
