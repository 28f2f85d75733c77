r"""Federations as an array axis: F seeds of one config in ONE program against F separate runs.

    python -m experiments.bench_federations                          # the demo, seeds 0,1,2,3
    python -m experiments.bench_federations --config.seeds=0,1 --config.train.rounds=4

The command line is experiments.run's (configs/demo.py by default; `--config.seeds` are the
federations, default 0,1,2,3; the first of `methods` / `method` is trained). In one process, on the
run's layout (Layout.build, as experiment.run lays out a method):

- separate: each seed as its own Simulation (comigs_jax.experiment.simulation), every jitted
  program and XLA cache cleared before it, as a fresh process would start: build, every round,
  the evaluations every eval.every_rounds and at the end, aggregation;
- stacked:  the F seeds as F federations of one Simulation (`federations=`), the same work.

Reported: wall seconds of each (data and base loading excluded, compiles included), the ratio
stacked / separate, XLA compiles and their seconds (jax.monitoring's backend-compile events), the
round programs built (one per Simulation config), and the largest difference between a
federation's final per-user test cross-entropy and its separate run's. Writes
{workdir}/bench_federations.json and prints a summary; the data and the pretrained base are the
run's (cached under data.cache_dir).
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import flags

from comigs_jax import cli

DEMO = os.path.join(cli.ROOT, "configs", "demo.py")


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", "runs/bench_federations", "Output directory.", flag_values=fv)


def _train(sim, data, cfg, seed) -> tuple[dict, int]:
    """Every round as experiment.run does it (evaluations every eval.every_rounds and at the last
    round, before aggregation); returns (the final pre-aggregation evaluation, rounds)."""
    ev = None
    for r in range(sim.n_rounds):
        sim.run_round()
        if (r + 1) % cfg.eval.every_rounds == 0 or r + 1 == sim.n_rounds:
            ev = sim.evaluate(data.test, cfg.eval.n_windows, cfg.eval.batch_size, cfg.eval.protocol, seed)
        sim.aggregate()
    return ev, sim.n_rounds


def benchmark(cfg, workdir: str) -> dict:
    import jax
    import numpy as np

    from comigs_jax import configuration
    from comigs_jax.data import load_user_data
    from comigs_jax.experiment import programs
    from comigs_jax.experiment.base_model import base_dir, base_tokenizer, load_base
    from comigs_jax.experiment.provenance import provenance
    from comigs_jax.experiment.simulation import Simulation
    from comigs_jax.federated.layout import Layout
    from comigs_jax.federated.methods import get_method

    if not cfg.seeds:
        cfg.seeds = "0,1,2,3"
    configuration.validate(cfg)
    seeds, method_name = configuration.seeds_of(cfg), configuration.methods_of(cfg)[0]
    cfg.data.min_tokens = max(cfg.data.min_tokens, cfg.train.seq_len + 1)
    os.makedirs(workdir, exist_ok=True)
    directory = base_dir(cfg)
    data_cfg = cfg.data.copy_and_resolve_references()
    data_cfg.tokenizer = base_tokenizer(cfg, directory)
    data = load_user_data(data_cfg)
    base_cfg, base = load_base(cfg, data.vocab_size, directory=directory)
    model_cfg, tc, method = configuration.model_config(cfg, base_cfg), configuration.train_config(cfg), \
        get_method(method_name)
    chunk = cfg.train.user_chunk if cfg.federation.mode == "vmap" else 0

    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiles.append(secs) if event == "/jax/core/compile/backend_compile_duration"
        else None)

    def fresh():  # what a new process starts with: no jitted program, no XLA executable
        for program in (programs.init_program, programs.round_program, programs.server_program,
                        programs.eval_program):
            program.cache_clear()
        jax.clear_caches()

    def measure(n_feds: int, build) -> dict:
        fresh()
        n0, p0 = len(compiles), programs.round_program.cache_info().misses
        t = time.perf_counter()
        out = build(Layout.build(cfg.data.n_users, pooled=method.pooled_data, shard=cfg.federation.shard,
                                 mode=cfg.federation.mode, chunk=chunk, n_federations=n_feds))
        jax.block_until_ready(out)
        return {"wall_s": time.perf_counter() - t, "compiles": len(compiles) - n0,
                "compile_s": sum(compiles[n0:]), "round_programs": programs.round_program.cache_info().misses - p0,
                "out": out}

    kw = dict(expert_counts=configuration.expert_counts_of(cfg), mode=cfg.federation.mode,
              weighting=cfg.federation.weighting, participation=cfg.federation.participation)

    def separate_one(seed):
        return lambda layout: _train(Simulation(model_cfg, tc, method, base, data.train, data.valid,
                                                layout=layout, seed=seed, **kw), data, cfg, seed)[0]["ce"]

    separate = [measure(1, separate_one(s)) for s in seeds]
    stacked = measure(len(seeds), lambda layout: _train(
        Simulation(model_cfg, tc, method, base, data.train, data.valid, layout=layout,
                   federations=[{"seed": s} for s in seeds], **kw), data, cfg, seeds)[0]["ce"])
    diff = max(float(np.max(np.abs(stacked["out"][f] - s["out"]))) for f, s in enumerate(separate))
    sep = {k: sum(s[k] for s in separate) for k in ("wall_s", "compiles", "compile_s", "round_programs")}
    st = {k: stacked[k] for k in sep}
    result = {"method": method_name, "seeds": seeds, "users": cfg.data.n_users, "rounds": tc.rounds,
              "local_steps": tc.local_steps, "devices": jax.device_count(), "backend": jax.default_backend(),
              "separate": sep, "separate_each": [{k: s[k] for k in sep} for s in separate], "stacked": st,
              "wall_ratio": st["wall_s"] / sep["wall_s"], "max_abs_test_ce_diff": diff,
              "provenance": provenance()}
    with open(os.path.join(workdir, "bench_federations.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def summary(r: dict) -> str:
    s, t = r["separate"], r["stacked"]
    return (f"{len(r['seeds'])} seeds of {r['method']} ({r['users']} users, {r['rounds']} rounds x "
            f"{r['local_steps']} steps, {r['devices']} {r['backend']} device(s)):\n"
            f"  separate: {s['wall_s']:.1f} s wall, {s['round_programs']} round programs, {s['compiles']} XLA "
            f"compiles ({s['compile_s']:.1f} s)\n"
            f"  stacked:  {t['wall_s']:.1f} s wall, {t['round_programs']} round program, {t['compiles']} XLA "
            f"compiles ({t['compile_s']:.1f} s)\n"
            f"  wall stacked / separate = {r['wall_ratio']:.3f}; final test CE max |diff| = "
            f"{r['max_abs_test_ce_diff']:.2e}")


def main(argv=None) -> int:
    argv = list(sys.argv if argv is None else argv)

    def body():
        cfg, fv = cli.parse_config(argv, DEMO, homes=cli.EXPERIMENT_HOMES, define=_define, doc=__doc__)
        cfg.output.progress = False
        print(summary(benchmark(cfg, fv.workdir)), flush=True)

    return cli.main_guard(body)


if __name__ == "__main__":
    sys.exit(main())
