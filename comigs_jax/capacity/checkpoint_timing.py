"""What checkpointing costs a round: U users' vmapped round followed by a checkpoint of every
user's state after each round, saved synchronously or asynchronously (experiments.bench with
`--config.checkpoints=none,sync,async`; the training loop's checkpoint.async_save).

Per way, in one process on the same compiled round and the same states (one device, `vmap`):
`round_s` is the median wall time from a round's start to the loop being free for the next
(the round, then the save's blocking part: the fingerprint and, async, the copy to host memory;
sync, the whole write; an async save also waits there for the previous one, so a write longer
than a round shows); `save_block_s` the median of that save part alone; `final_wait_s` the wait
for the last save in flight at the end (what a run's last round adds once). Saving every round
is the worst case of checkpoint.every_rounds = 1. Ratios are against `sync` of the same run.
"""
from __future__ import annotations

import os
import shutil
import statistics
import time

import jax
import numpy as np

from comigs_jax.capacity.workload import Workload, build_mode
from comigs_jax.experiment.checkpoint import RunCheckpoints

WAYS = ("none", "sync", "async")


def state_bytes(tree) -> int:
    return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree)))


def time_checkpoints(w: Workload, ways: list[str], rounds: int, directory: str) -> list[dict]:
    """One row per way in `ways` (of WAYS): `rounds` timed rounds each, after one untimed round
    that compiles. Checkpoints go to `directory`/<way> (removed after)."""
    fn, inputs, info = build_mode("vmap", w, consume=True)
    states = inputs.pop("states")
    args = lambda: (inputs["base"], states, inputs["data"], inputs["masks"], inputs["active"])
    fn = fn.lower(*args()).compile()
    states, _ = jax.block_until_ready(fn(*args()))
    size = state_bytes(states)
    rows = []
    for way in ways:
        where = os.path.join(directory, way)
        shutil.rmtree(where, ignore_errors=True)
        ck = None if way == "none" else RunCheckpoints(where, max_to_keep=2, async_save=way == "async")
        times, blocks = [], []
        for i in range(rounds):
            t0 = time.perf_counter()
            states, _ = jax.block_until_ready(fn(*args()))
            t1 = time.perf_counter()
            if ck is not None:
                ck.save(i + 1, states, {"round": i + 1})
            t2 = time.perf_counter()
            times.append(t2 - t0)
            blocks.append(t2 - t1)
        t = time.perf_counter()
        if ck is not None:
            ck.close()  # the last save in flight completes
        final = time.perf_counter() - t
        shutil.rmtree(where, ignore_errors=True)
        rows.append({"model": w.name, "users": w.n_users, "way": way, "rounds": rounds, "chunk": info["chunk"],
                     "state_mib": size / 2**20, "state_mib_per_user": size / 2**20 / w.n_users,
                     "round_s": statistics.median(times), "round_s_all": times,
                     "save_block_s": statistics.median(blocks), "final_wait_s": final})
    sync = next((r for r in rows if r["way"] == "sync"), None)
    for r in rows:
        r["round_vs_sync"] = None if sync is None else r["round_s"] / sync["round_s"]
    return rows


def run_checkpoint_bench(cfg, argv=None) -> dict:
    """Every configured model and U, each way of cfg.checkpoints; bench_checkpoints.json / .md in
    cfg.out_dir (process 0). One process only (the bench's other keys: models, users, dtype,
    user_chunk, method, seed)."""
    from comigs_jax.capacity.report import write_report
    from comigs_jax.capacity.timing import machine_info
    from comigs_jax.capacity.workload import _ints, _names, _users_of, build_workload
    ways = _names(cfg.checkpoints)
    dtype = cfg.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    rows, base = [], None
    for model in _names(cfg.models):
        for u in _ints(_users_of(cfg, model)):
            w = build_workload(model, cfg[model], u, cfg.method, dtype, cfg.seed, base, cfg.remat, cfg.user_chunk)
            base = w.base
            rows += time_checkpoints(w, ways, cfg.checkpoint_rounds, os.path.join(cfg.out_dir, "checkpoint_bench"))
            del w
        base = None
    result = {"machine": machine_info(argv), "config": cfg.to_dict(), "dtype": dtype, "load_at_start": load,
              "load_at_end": ", ".join(f"{x:.2f}" for x in os.getloadavg()), "rows": rows}
    result["markdown"] = checkpoints_markdown(rows, load, result["load_at_end"])
    if jax.process_index() == 0:
        write_report(cfg.out_dir, "bench_checkpoints", result, default=str)
    return result


def checkpoints_markdown(rows: list[dict], load: str, load_end: str) -> str:
    head = ("| model | U | state MiB (per user) | way | round s (median) | save blocks s | final wait s "
            "| round / sync |\n|---|---|---|---|---|---|---|---|\n")
    ratio = lambda r: "" if r["round_vs_sync"] is None else f"{r['round_vs_sync']:.2f}"
    lines = [f"| {r['model']} | {r['users']:,} | {r['state_mib']:,.0f} ({r['state_mib_per_user']:.3f}) | {r['way']} "
             f"| {r['round_s']:.3f} | {r['save_block_s']:.3f} | {r['final_wait_s']:.3f} | {ratio(r)} |" for r in rows]
    return f"Load average (1, 5, 15 min): {load} at the start, {load_end} at the end\n\n" + head + "\n".join(lines) + "\n"
