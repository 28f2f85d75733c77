"""The benchmark's library (experiments.bench is its command line; its docstring says what is
measured): the config's checks, and every configured model size, U and mode run, reported and
written as bench.json and bench.md."""
from __future__ import annotations

import time

import jax
from absl import logging
from ml_collections import ConfigDict

from comigs_jax import configuration, distributed
from comigs_jax.capacity.checkpoint_timing import WAYS as CHECKPOINT_WAYS
from comigs_jax.capacity.report import check_targets, report_markdown, write_report
from comigs_jax.capacity.sweep import sweep_model
from comigs_jax.capacity.timing import _print, bench_workload, machine_info, peak_all_processes, peak_reference
from comigs_jax.capacity.workload import MODES, _ints, _names, _users_key, _users_of, build_workload, workload_configs
from comigs_jax.errors import ConfigError
from comigs_jax.federated.layout import Layout
from comigs_jax.federated.sharding import users_mesh
from comigs_jax.model.config import REMAT
from comigs_jax.model.precision import missing_x64

FLOP_CONVENTION = ("1 multiply-add = 2 FLOPs; round FLOPs = comigs_jax.capacity.round_flops (matmuls only: "
                   "forward, input gradients on the path to a trainable leaf, trainable weight gradients) "
                   "of the per-user expert and router steps x steps per round x U; peak = median "
                   "n x n x n matmul (2n^3 FLOPs) in the model dtype, same process")


def _fail(key: str, value, allowed: str):
    raise ConfigError(f"config.{key}={value!r} is not allowed: {allowed}")


def check_config(cfg: ConfigDict, workloads) -> None:
    """Every check that needs no device work, before the peak matmul: ConfigError (one line).
    `workloads`: the model sizes `models` may list (configs/bench.py's WORKLOADS, each a group of cfg)."""
    ways = _names(cfg.get("checkpoints", ""))
    if set(ways) - set(CHECKPOINT_WAYS):
        _fail("checkpoints", cfg.checkpoints, f"'' or comma-separated, of {', '.join(CHECKPOINT_WAYS)}")
    if ways and (not isinstance(cfg.checkpoint_rounds, int) or cfg.checkpoint_rounds < 1):
        _fail("checkpoint_rounds", cfg.checkpoint_rounds, "a positive integer")
    if ways and cfg.sweep:
        _fail("sweep", cfg.sweep, "False when timing checkpoints (config.checkpoints)")
    bad = set(_names(cfg.modes)) - set(MODES)
    if bad or not _names(cfg.modes):
        _fail("modes", cfg.modes, f"comma-separated, of {', '.join(MODES)}")
    models = _names(cfg.models)
    if not models or set(models) - set(workloads):
        _fail("models", cfg.models, f"comma-separated, of {', '.join(workloads)}")
    if cfg.method not in configuration.METHODS:
        _fail("method", cfg.method, f"one of {', '.join(sorted(configuration.METHODS))}")
    if cfg.dtype not in ("", "float32", "bfloat16", "float64"):
        _fail("dtype", cfg.dtype, "'' (float32 on CPU, bfloat16 on accelerators) | float32 | bfloat16 | float64")
    if missing_x64(cfg.dtype):
        _fail("dtype", cfg.dtype, "float64 needs 64-bit JAX (JAX_ENABLE_X64=1 in the environment)")
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


def run_benchmark(cfg: ConfigDict, workloads, argv=None) -> dict:
    """Runs every configured model size, U and mode; writes bench.json and bench.md (process 0);
    returns the results. ConfigError (one line) for a config value that is not allowed. `workloads`:
    as check_config's. `argv`:
    the command line recorded in bench.json (default sys.argv)."""
    check_config(cfg, workloads)
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
    write_report(cfg.out_dir, "bench", result)
    return result
