"""One program of runs: the runs of one method (one run alone, or several resuming from the same
round) trained as federations of ONE Simulation, in named steps:

    prog = open_program(...)                   # the Simulation, each run's metrics writer
    start, metas = restore_runs(prog)          # each run's latest checkpoint, from its own layout
    pre_eval = train_rounds(prog, start)       # per round: checks -> evaluation -> aggregation ->
                                               #   records -> checkpoint (one_round)
    results = outputs.write_outputs(prog, ...) # each run's results, figures

One federation is the case F = 1: every step loops over the program's runs; each run's folder,
records and checkpoints are what the run alone writes (its checkpoints in the one-federation
layout: Simulation.federation_states / host_states), so either kind of run resumes the other's.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time

import numpy as np
from tqdm import tqdm

from comigs_jax import configuration, distributed
from comigs_jax.errors import Stopped
from comigs_jax.experiment import metrics, numerics, tracking
from comigs_jax.experiment.log import log
from comigs_jax.experiment.simulation import Simulation
from comigs_jax.federated import accounting
from comigs_jax.federated.layout import Layout
from comigs_jax.train.state import ROW_HPARAMS


class Regroup(Exception):
    """The runs of a program restored different rounds (a corrupt checkpoint fell back)."""


@dataclasses.dataclass
class Program:
    """What every step of a program reads: its runs (loop._Run), the Simulation, each run's train
    config as it would be alone, writers, names for messages. `saved`: the last round checkpointed."""
    method: object
    runs: list
    sim: Simulation
    cfg: object  # the first run's config (the runs differ only in configuration.FEDERATION_KEYS)
    tcs: list
    model_cfg: object
    data: object
    run_layout: Layout
    writers: list
    name: str
    where: str
    saved: int = 0

    @property
    def n_models(self) -> int:
        return self.run_layout.n_models

    @property
    def rounds(self) -> int:
        return self.sim.tc.rounds


def encode_eval(ev: dict) -> dict:
    """An evaluation (numpy arrays) as exact JSON (kept in the final checkpoint)."""
    return {k: {"dtype": str(np.asarray(v).dtype), "shape": list(np.shape(v)), "data": np.ravel(v).tolist()}
            for k, v in ev.items()}


def decode_eval(blob: dict) -> dict:
    return {k: np.asarray(v["data"], dtype=v["dtype"]).reshape(v["shape"]) for k, v in blob.items()}


def pick(tree: dict, f: int) -> dict:
    """Federation f's part of a by-federation output ({key: [F, ...]})."""
    return {k: v[f] for k, v in tree.items()}


def open_program(method, runs: list, data, base_cfg, base, layout: Layout, run_layout: Layout) -> Program:
    """The Simulation of `runs` as federations (on `layout`; each run alone would use `run_layout`)
    and each run's metrics writer."""
    cfg = runs[0].cfg
    model_cfg = configuration.model_config(cfg, base_cfg)
    feds = [configuration.federation_of(r.cfg, r.seed) for r in runs]
    sim = Simulation(model_cfg, configuration.train_config(cfg), method, base, data.train, data.valid,
                     configuration.federation_config(cfg, feds), layout=layout, user_indices=data.indices)
    # each run's train config as it would be alone (its hyper-parameters; Centralized's pooled batch)
    tcs = [dataclasses.replace(sim.tc, **{k: v for k, v in fed.items() if k in ROW_HPARAMS}) for fed in sim.federations]
    main = distributed.is_main_process()
    writers = [metrics.MetricsWriter(os.path.join(r.run_dir, "metrics.jsonl") if main else None,
                                     tensorboard=cfg.output.get("tensorboard", False), users=data.users,
                                     per_user_limit=cfg.output.get("per_user_limit", 64),
                                     wandb=tracking.options(r.cfg, r.run_dir)) for r in runs]
    seeds = [r.seed for r in runs]
    one_cfg = all(r.cfg is cfg for r in runs)  # a method's seeds; else the cells of a grid
    name = f"{method.name} s{','.join(map(str, seeds))}" if one_cfg else f"{method.name} {len(runs)} runs"
    where = ", ".join(r.run_dir for r in runs) if len(runs) <= 4 else \
        f"{len(runs)} folders under {os.path.commonpath([r.run_dir for r in runs])}"
    return Program(method, runs, sim, cfg, tcs, model_cfg, data, run_layout, writers, name, where)


def restore_runs(prog: Program) -> tuple[int, list[dict]]:
    """(start round, each run's checkpoint meta) after restoring the runs' latest checkpoints into
    the Simulation (each from its own program's layout); (0, [{}...]) for fresh runs. Regroup
    when the runs' latest intact checkpoints are of different rounds."""
    sim, runs = prog.sim, prog.runs
    start, metas = 0, [{} for _ in runs]
    if any(r.resume for r in runs):
        template = sim.federation_states(0, prog.run_layout)
        found = [r.ckpts.restore_latest(template, r.identity, log=log) if r.resume else None for r in runs]
        rounds = {f[0] if f is not None else 0 for f in found}
        if len(rounds) > 1:
            raise Regroup()
        start = rounds.pop()
        if start:
            metas = [f[2] for f in found]
            sim.set_federation_states([f[1] for f in found], prog.run_layout)
            sim.restore_host_states([m["host"] for m in metas], prog.run_layout)
    for w in prog.writers:
        w.truncate(start)
    prog.saved = start
    for r in runs:
        r.ckpts.complete = start or None
    if start:
        log(f"[{prog.name}] resumed from round {start} ({prog.where})")
    return start, metas


def evaluate(prog: Program) -> dict:
    """Every run's users on their test splits: {key: [F, U, ...]}."""
    cfg = prog.cfg
    return prog.sim.evaluate(prog.data.test, cfg.eval.n_windows, cfg.eval.batch_size, cfg.eval.protocol,
                             [r.seed for r in prog.runs], by_federation=True)


def fault(prog: Program, what: str, round_index: int, f: int, user=None, step=None):
    """The NumericalFault of run f (named when the program has several runs)."""
    run = prog.runs[f]
    what = what if len(prog.runs) == 1 else f"{run.label}: {what}"
    names = prog.data.users if prog.n_models == len(prog.data.users) else ["the pooled model"]
    return numerics.fault(what, round_index, names, user, step, prog.sim.tc.local_steps, prog.tcs[f].lr, prog.saved,
                          run.ckpts.directory)


def second_signal(prog: Program, signum) -> str:
    """What a second SIGINT/SIGTERM prints as it ends the process at once."""
    several = len(prog.runs) > 1
    done = [r.ckpts.last_complete() or 0 for r in prog.runs]  # a save in flight is lost with the process
    saved = min(done) if done else 0
    same = len(set(done)) == 1
    kept = (f"the last complete checkpoint{'s are' if several and same else ' is'} "
            f"{'round' if same else 'at least round'} {saved}"
            + ("" if several else f" in {prog.runs[0].ckpts.directory}")) if saved else "no checkpoint was written"
    return (f"stopped at once by a second {signal.Signals(signum).name} ({kept}); running the same command "
            "resumes from it")


def train_rounds(prog: Program, start: int, stop) -> dict | None:
    """Rounds start + 1 .. rounds; returns the last round's pre-aggregation evaluation (None when
    no round ran: a finished run resumed)."""
    cfg, rounds = prog.cfg, prog.rounds
    bar = tqdm(range(start, rounds), desc=prog.name, initial=start, total=rounds, file=sys.stdout,
               disable=not cfg.output.progress or not distributed.is_main_process(), dynamic_ncols=True)
    if start < rounds:
        n, one_cfg = len(prog.runs), all(r.cfg is cfg for r in prog.runs)
        what = f"{n} {'seeds' if one_cfg else 'runs'} as one program, " if n > 1 else ""
        log(f"[{prog.name}] {what}rounds {start + 1}..{rounds} in {prog.where} "
            "(SIGINT/SIGTERM: stop after the current round with a checkpoint; a second one: at once)")
    pre_eval = None
    for r in bar:
        pre_eval = one_round(prog, r, start, bar, pre_eval)
        stopping = r + 1 < rounds and stop.requested()
        if (r + 1) % cfg.checkpoint.every_rounds == 0 or r + 1 == rounds or stopping:
            checkpoint(prog, r + 1, pre_eval if r + 1 == rounds else None)
        if stopping:
            bar.close()
            wait_for_saves(prog)  # the message says the checkpoint is written: it is, before the exit
            raise _stopped(prog, stop, r + 1)
    bar.close()
    wait_for_saves(prog)  # the final checkpoint is complete before the outputs that follow it
    return pre_eval


def one_round(prog: Program, r: int, start: int, bar, pre_eval):
    """Round r + 1: local steps, checks, evaluation (every eval.every_rounds and the last), the
    server, each run's metrics record. Returns the latest pre-aggregation evaluation."""
    sim = prog.sim
    t0 = time.perf_counter()
    m = sim.run_round(by_federation=True)  # [F, U, steps, ...]
    dt = time.perf_counter() - t0
    records = check_round(prog, r, m, dt, first=r == start)  # before the poisoned state is aggregated or saved
    if (r + 1) % prog.cfg.eval.every_rounds == 0 or r + 1 == prog.rounds:
        bar.set_postfix_str("evaluating the test splits")  # one device call: no finer progress
        pre_eval = evaluate(prog)  # local models before aggregation, as the reference
        check_test_loss(prog, r, pre_eval, records)
    sim.aggregate()
    eps = {}
    if sim.setup.dp is not None:  # the privacy spent after this round's release (the same for every run)
        eps = {"eps": f"{accounting.epsilon(sim.setup.dp, r + 1):.3g}"}
        for rec in records:
            rec["dp_epsilon"], rec["dp_delta"] = accounting.epsilon(sim.setup.dp, r + 1), sim.setup.dp.delta
    write_records(prog, records)
    bar.set_postfix(loss=f"{np.mean(records[0]['train_ce']):.3f}", tok_s=f"{records[0]['tokens_per_s']:,.0f}",
                    **eps)
    return pre_eval


def check_round(prog: Program, r: int, m: dict, dt: float, first: bool) -> list[dict]:
    """NumericalFault for a non-finite training metric of a user that trained, or non-finite
    parameters / optimizer state; else each run's record of round r + 1."""
    sim, n_feds, n_models = prog.sim, len(prog.runs), prog.n_models
    active = np.asarray(sim.trained)[np.asarray(sim.real)].reshape(n_feds, -1)[:, :n_models]
    for f in range(n_feds):
        bad = numerics.first_nonfinite(pick(m, f), active[f])
        if bad is not None:
            st, u, k, x = bad
            raise fault(prog, f"non-finite training metric {k} ({x})", r + 1, f, u, st + 1)
    per = sim.layout.models_per_federation
    bad_rows = [u for u in numerics.nonfinite_users(sim.states) if u < n_feds * per]
    if bad_rows:
        raise fault(prog, "non-finite parameters or optimizer state (finite losses, overflowing update)",
                    r + 1, bad_rows[0] // per, bad_rows[0] % per)
    records = [metrics.round_record(r + 1, pick(m, f), prog.tcs[f], prog.model_cfg, dt, n_models, active=active[f])
               for f in range(n_feds)]
    for rec in records:
        if n_feds > 1:
            rec["stacked_seeds"] = [run.seed for run in prog.runs]  # dt: the round of every run at once
        if first:
            rec["includes_compile"] = True
    return records


def check_test_loss(prog: Program, r: int, ev: dict, records: list[dict]) -> None:
    """NumericalFault for a non-finite test loss; else each record's test perplexities."""
    ce = np.asarray(ev["ce"])
    if not np.isfinite(ce).all():
        f, u = map(int, np.argwhere(~np.isfinite(ce))[0])
        raise fault(prog, f"non-finite test loss ({ce[f, u]})", r + 1, f, u)
    for f, rec in enumerate(records):
        rec["test_ppl"] = np.exp(ce[f]).tolist()


def write_records(prog: Program, records: list[dict]) -> None:
    """Each run's metrics line of the round, with what the server did: each user's expert LoRA
    rank after it (HetLoRA's cuts; per LoRA module too where the server keeps them), PCL's
    perplexities and mixing weights."""
    sim, per = prog.sim, prog.sim.layout.models_per_federation
    ranks, modules = sim.current_ranks(), sim.current_module_ranks()
    for f, (w, rec) in enumerate(zip(prog.writers, records)):
        if ranks is not None:
            rec["expert_ranks"] = [int(x) for x in ranks[f * per:f * per + prog.n_models]]
        if modules is not None:  # a rank per LoRA module: the communication counts them
            rec["expert_module_ranks"] = modules[f * per:f * per + prog.n_models].tolist()
        if sim.last_mixing is not None:
            rec["pcl"] = {k: v if k == "round" else v[f] for k, v in sim.last_mixing.items()}
        w.write(rec)


def checkpoint(prog: Program, round_index: int, pre_eval: dict | None) -> None:
    """Each run's checkpoint of `round_index` as its own program writes it; the last round's also
    keeps the pre-aggregation evaluation the results need (the state cannot give it back)."""
    hosts = prog.sim.host_states(prog.run_layout)
    for f, run in enumerate(prog.runs):
        meta = {"host": hosts[f], "round": round_index, "identity": run.identity}
        if pre_eval is not None:
            meta["pre_eval"] = encode_eval(pick(pre_eval, f))
        run.ckpts.save(round_index, prog.sim.federation_states(f, prog.run_layout), meta)
    prog.saved = round_index


def wait_for_saves(prog: Program) -> None:
    """Block until every run's save in flight (checkpoint.async_save) is complete on disk."""
    for run in prog.runs:
        run.ckpts.wait()


def _stopped(prog: Program, stop, round_index: int) -> Stopped:
    runs, several = prog.runs, len(prog.runs) > 1
    sig = signal.Signals(stop.signum).name if stop.signum else "a signal on another process"
    dirs = ", ".join(run.ckpts.directory for run in runs) if len(runs) <= 4 else f"checkpoints/ of {prog.where}"
    return Stopped(f"stopped by {sig} at the end of round {round_index} of {prog.rounds}; checkpoint"
                   f"{'s' if several else ''} of round {round_index} written to {dirs}", stop.signum,
                   round_index, prog.rounds, runs[0].ckpts.directory)
