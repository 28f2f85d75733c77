"""The bench's measurements: the machine (its peak matmul, resident memory, versions), one mode's
compile and round times at one workload, every mode of a workload."""
from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from ml_collections import ConfigDict

from comigs_jax import distributed
from comigs_jax.capacity.workload import LOOP_MODES, Workload, build_mode, workload_flops
from comigs_jax.experiment.provenance import provenance


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


def _print(msg: str) -> None:
    """Print on process 0 only (the other processes print nothing but errors)."""
    if jax.process_index() == 0:
        print(msg, flush=True)
