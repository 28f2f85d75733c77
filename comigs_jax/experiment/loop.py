"""The experiment loop: a config and a workdir in, every (method, seed)'s results out.

    from comigs_jax import experiment
    results = experiment.run(cfg, "runs/demo")       # {(method, seed): results.json's content}

`run` validates the config, lays the users out, loads the data (each process only its own
users) and the base once, then trains and evaluates every (method, seed) in
WORKDIR/<method>_s<seed>/ (WORKDIR itself for one run): config.json, metrics.jsonl, checkpoints/,
results.json / .md, figures; several runs also write WORKDIR/comparison.*. Calling it again on the
same workdir resumes every run from its latest checkpoint. Failures are typed exceptions
(comigs_jax.errors) with one-line messages; a signal stops it with `Stopped` after a checkpoint.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import sys
import time

import jax
import numpy as np
from ml_collections import ConfigDict
from tqdm import tqdm

from comigs_jax import compilation_cache, configuration, distributed
from comigs_jax.data import DataSourceError, InsufficientDataError, load_user_data
from comigs_jax.data.reference_bins import check_token_ids
from comigs_jax.errors import ConfigError, DataError, Stopped, WorkdirError, first_line
from comigs_jax.experiment import identity as identity_lib
from comigs_jax.experiment import metrics, numerics, plot, tracking
from comigs_jax.experiment.base_model import base_dir, base_tokenizer, load_base
from comigs_jax.experiment.checkpoint import RunCheckpoints
from comigs_jax.experiment.signals import StopOnSignal
from comigs_jax.experiment.simulation import Simulation
from comigs_jax.federated import communication
from comigs_jax.federated.layout import Layout, data_users
from comigs_jax.federated.methods import get_method


def log(msg: str) -> None:
    """Print on process 0 only (the other processes of a multi-host run log nothing but errors)."""
    if jax.process_index() == 0:
        print(msg, flush=True)


def encode_eval(ev: dict) -> dict:
    """An evaluation (numpy arrays) as exact JSON (kept in the final checkpoint)."""
    return {k: {"dtype": str(np.asarray(v).dtype), "shape": list(np.shape(v)), "data": np.ravel(v).tolist()}
            for k, v in ev.items()}


def decode_eval(blob: dict) -> dict:
    return {k: np.asarray(v["data"], dtype=v["dtype"]).reshape(v["shape"]) for k, v in blob.items()}


def layouts_of(cfg, methods, n_federations: int = 1) -> dict[str, Layout]:
    """One layout per method (Centralized's one model lays out differently), on the run's mesh;
    users in chunks of train.user_chunk in the vmapped mode (the loop runs one user at a time);
    n_federations > 1: the seeds stacked as federations of one program (federation.stack_seeds)."""
    chunk = cfg.train.user_chunk if cfg.federation.mode == "vmap" else 0
    return {m: Layout.build(cfg.data.n_users, pooled=get_method(m).pooled_data, shard=cfg.federation.shard,
                            mode=cfg.federation.mode, chunk=chunk, n_federations=n_federations) for m in methods}


def run_dir_of(workdir: str, method: str, seed: int, n_runs: int) -> str:
    return workdir if n_runs == 1 else os.path.join(workdir, f"{method}_s{seed}")


def make_workdir(path: str) -> None:
    """Create `path`; WorkdirError (one line) when it cannot hold a run."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise workdir_error(path, e) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise WorkdirError(f"workdir {path} is not writable; use another --workdir")


def workdir_error(path: str, e: OSError) -> WorkdirError:
    why = {errno.ENOTDIR: "a part of the path is a regular file, not a directory",
           errno.EEXIST: "it exists and is not a directory",
           errno.EACCES: "permission denied", errno.EPERM: "permission denied",
           errno.EROFS: "read-only file system", errno.ENOSPC: "no space left on the device"}.get(
        e.errno, e.strerror or type(e).__name__)
    return WorkdirError(f"workdir {path} cannot be used: {why} ({e.filename or path}); use another --workdir")


# ----------------------------------------------------------------------------- runs
@dataclasses.dataclass
class _Run:
    """One (config, method, seed) run: its folder and checkpoints; a federation of its program."""
    cfg: ConfigDict  # the run's own config (runs of one program differ only in FEDERATION_KEYS)
    seed: int
    run_dir: str
    label: str  # names the run in a program of several ("seed 7", "cell lr=0.01 seed 7")
    identity: dict | None = None
    ckpts: RunCheckpoints | None = None
    resume: bool = False


def train_and_evaluate(cfg, method_name: str, seed: int, data, base_cfg, base, run_dir: str, layout: Layout) -> dict:
    """One method, one seed: train, evaluate, checkpoint, write outputs. Returns its results."""
    run = _Run(cfg, seed, run_dir, f"seed {seed}")
    return train_runs(method_name, [run], data, base_cfg, base, lambda n_feds: layout, stack=False)[0]


def train_runs(method_name: str, runs: list[_Run], data, base_cfg, base, layout_of, stack: bool) -> list[dict]:
    """Train and evaluate `runs` of one method, each in its folder (config.json, metrics.jsonl,
    checkpoints/, results, figures: the same whether it trains alone or with others).

    stack=False: each run as its own program. stack=True: the runs that resume from the same
    round (every fresh run: round 0) train as federations of ONE program; each run's checkpoints
    are laid out as its own program's, so either way resumes the other's. layout_of(F): the
    method's Layout for F federations."""
    method = get_method(method_name)
    for run in runs:  # every folder checked before any is touched: another config's run is WorkdirError
        run.identity = identity_lib.run_identity(run.cfg, method_name, run.seed)
        run.resume = identity_lib.check_workdir(run.run_dir, run.identity, run.cfg.resume)
    try:
        for run in runs:
            make_workdir(run.run_dir)
            run.ckpts = RunCheckpoints(os.path.join(run.run_dir, "checkpoints"), run.cfg.checkpoint.max_to_keep)
            if not run.resume and run.cfg.resume and run.ckpts.all_rounds():
                run.resume = True  # checkpoints without a config.json: never wiped unasked (restore checks their identity)
            if not run.resume:
                run.ckpts.delete_all()
            if distributed.is_main_process():
                identity_lib.write_config_json(run.run_dir, run.identity, run.cfg)
        done = {}
        while len(done) < len(runs):
            for group in _groups([r for r in runs if r.run_dir not in done], stack):
                try:
                    results = _train_program(method, group, data, base_cfg, base, layout_of(len(group)),
                                             layout_of(1))
                except _Regroup:  # a corrupt checkpoint set aside: a run resumes from an earlier round
                    break
                done.update({r.run_dir: res for r, res in zip(group, results)})
        return [done[r.run_dir] for r in runs]
    finally:
        for run in runs:
            if run.ckpts is not None:
                run.ckpts.close()


def _groups(runs: list[_Run], stack: bool) -> list[list[_Run]]:
    """The programs to train: each run alone, or (stack) the runs by the round they resume from."""
    if not stack:
        return [[r] for r in runs]
    by_round = {}
    for r in runs:
        by_round.setdefault((r.ckpts.latest() or 0) if r.resume else 0, []).append(r)
    return list(by_round.values())


class _Regroup(Exception):
    """The runs of a program restored different rounds (a corrupt checkpoint fell back)."""


def _simulation(cfg, model_cfg, tc, method, base, data, layout, **kw) -> Simulation:
    """The run's Simulation (kw: its seed, or its runs' federations)."""
    return Simulation(model_cfg, tc, method, base, data.train, data.valid, layout=layout,
                      ranks=configuration.ranks_of(cfg), expert_counts=configuration.expert_counts_of(cfg),
                      mode=cfg.federation.mode, weighting=cfg.federation.weighting,
                      participation=cfg.federation.participation, dropout=cfg.federation.get("dropout", 0.0),
                      user_indices=data.indices, **kw)


def _communication(cfg, sim, records: list, n_models: int) -> dict:
    """results.json's `communication` of one run from its metrics records: the rounds each user
    trained (and so uploaded), the configured ranks (model.ranks) and, when the run logged them
    (`expert_ranks`, a ranked run), each round's ranks and who uploaded."""
    taken = [sum(1 for r in records if r["expert_tokens_per_s_per_user"][u] > 0) for u in range(n_models)]
    ranks = configuration.ranks_of(cfg)
    kw = {"ranks": ranks[:n_models] if ranks is not None and len(ranks) >= n_models else None}
    if records and all("expert_ranks" in r for r in records):
        kw["round_ranks"] = [r["expert_ranks"] for r in records]
        kw["round_taken"] = [[x > 0 for x in r["expert_tokens_per_s_per_user"][:n_models]] for r in records]
    return communication.accounting(sim.model_cfg, sim.method, sim.expert_counts[:n_models], sim.tc.rounds, taken,
                                    **kw)


def _restore(sim, runs: list[_Run], run_layout: Layout) -> tuple[int, list[dict]]:
    """(start round, each run's checkpoint meta) after restoring the runs' latest checkpoints into
    `sim` (each from its own program's layout); (0, [{}...]) for fresh runs."""
    if not any(r.resume for r in runs):
        return 0, [{} for _ in runs]
    one = sim.n_federations == 1
    template = sim.states if one else sim.federation_states(0, run_layout)
    found = [r.ckpts.restore_latest(template, r.identity, log=log) if r.resume else None for r in runs]
    rounds = {f[0] if f is not None else 0 for f in found}
    if len(rounds) > 1:
        raise _Regroup()
    start = rounds.pop()
    if start == 0:
        return 0, [{} for _ in runs]
    metas = [f[2] for f in found]
    if one:
        sim.states = found[0][1]
        sim.restore_host_state(metas[0]["host"])
    else:
        sim.set_federation_states([f[1] for f in found], run_layout)
        host = {"round_index": metas[0]["host"]["round_index"], "rng": [m["host"]["rng"] for m in metas]}
        if sim.ranks is not None:
            ranks = sim.ranks.current.copy()
            for f, m in enumerate(metas):
                if "ranks" in m["host"]:
                    rows = sim.federation_rows(f, run_layout)[:sim.layout.models_per_federation]
                    ranks[rows] = np.asarray(m["host"]["ranks"])[:len(rows)]
            host["ranks"] = ranks.tolist()
        sim.restore_host_state(host)
    return start, metas


def _run_host_state(sim, host: dict, f: int, run_layout: Layout) -> dict:
    """Run f's host state as its own program would checkpoint it (round, its sampler, its ranks)."""
    if sim.n_federations == 1:
        return host
    out = {"round_index": host["round_index"], "rng": host["rng"][f]}
    if "ranks" in host:
        out["ranks"] = [int(host["ranks"][i]) for i in sim.federation_rows(f, run_layout)]
    return out


def _train_program(method, runs: list[_Run], data, base_cfg, base, layout: Layout, run_layout: Layout) -> list[dict]:
    """Runs of one method (one, or several resuming from the same round) as federations of ONE
    program: train, evaluate, checkpoint each as its own program would, write each run's outputs."""
    n_feds, n_models, cfg = len(runs), run_layout.n_models, runs[0].cfg
    model_cfg = configuration.model_config(cfg, base_cfg)
    tc = configuration.train_config(cfg)
    kw = {"seed": runs[0].seed} if n_feds == 1 else \
        {"federations": [configuration.federation_of(r.cfg, r.seed) for r in runs]}
    sim = _simulation(cfg, model_cfg, tc, method, base, data, layout, **kw)
    # each run's train config as it would be alone (its hyper-parameters; Centralized's pooled batch)
    tcs = [dataclasses.replace(sim.tc, **{k: v for k, v in fed.items() if k != "seed"}) for fed in sim.federations]
    pick = (lambda tree, f: tree) if n_feds == 1 else (lambda tree, f: {k: v[f] for k, v in tree.items()})
    writers = [metrics.MetricsWriter(os.path.join(r.run_dir, "metrics.jsonl") if distributed.is_main_process() else None,
                                     tensorboard=cfg.output.get("tensorboard", False), users=data.users,
                                     per_user_limit=cfg.output.get("per_user_limit", 64),
                                     wandb=tracking.options(r.cfg, r.run_dir)) for r in runs]
    start, metas = _restore(sim, runs, run_layout)
    for w in writers:
        w.truncate(start)
    seeds = [r.seed for r in runs]
    one_cfg = all(r.cfg is cfg for r in runs)  # a method's seeds; else the cells of a grid
    name = f"{method.name} s{','.join(map(str, seeds))}" if one_cfg else f"{method.name} {n_feds} runs"
    where = ", ".join(r.run_dir for r in runs) if n_feds <= 4 else \
        f"{n_feds} folders under {os.path.commonpath([r.run_dir for r in runs])}"
    if start:
        log(f"[{name}] resumed from round {start} ({where})")

    evaluate = lambda: sim.evaluate(data.test, cfg.eval.n_windows, cfg.eval.batch_size, cfg.eval.protocol,
                                    seeds[0] if n_feds == 1 else seeds)
    bar = tqdm(range(start, tc.rounds), desc=name, initial=start, total=tc.rounds, file=sys.stdout,
               disable=not cfg.output.progress or not distributed.is_main_process(), dynamic_ncols=True)
    zero_shot = [None] * n_feds
    if cfg.eval.get("zero_shot"):
        ev0 = evaluate() if start == 0 else None
        zero_shot = [_zero_shot(r.run_dir, pick(ev0, f) if ev0 is not None else None) for f, r in enumerate(runs)]
    names = data.users if n_models == len(data.users) else ["the pooled model"]
    saved, pre_eval = start, None

    def fault(what, r, f, user=None, step=None):
        what = what if n_feds == 1 else f"{runs[f].label}: {what}"
        return numerics.fault(what, r, names, user, step, tc.local_steps, tcs[f].lr, saved, runs[f].ckpts.directory)

    def second_signal(signum):
        kept = (f"the last complete checkpoint{'s are' if n_feds > 1 else ' is'} round {saved}"
                + (f" in {runs[0].ckpts.directory}" if n_feds == 1 else "")) if saved else "no checkpoint was written"
        return (f"stopped at once by a second {signal.Signals(signum).name} ({kept}); running the same command "
                "resumes from it")

    with StopOnSignal(second_signal) as stop:
        if start < tc.rounds:
            what = "" if n_feds == 1 else f"{n_feds} {'seeds' if one_cfg else 'runs'} as one program, "
            log(f"[{name}] {what}rounds {start + 1}..{tc.rounds} in {where} "
                "(SIGINT/SIGTERM: stop after the current round with a checkpoint; a second one: at once)")
        for r in bar:
            t0 = time.perf_counter()
            m = sim.run_round()  # [U, steps, ...] ([F, U, steps, ...] with several runs)
            dt = time.perf_counter() - t0
            # numerical faults: stop before the poisoned state is aggregated or checkpointed
            active = np.asarray(sim.active)[np.asarray(sim.real)].reshape(n_feds, -1)[:, :n_models]
            for f in range(n_feds):
                bad = numerics.first_nonfinite(pick(m, f), active[f])
                if bad is not None:
                    st, u, k, x = bad
                    raise fault(f"non-finite training metric {k} ({x})", r + 1, f, u, st + 1)
            per = sim.layout.models_per_federation
            bad_rows = [u for u in numerics.nonfinite_users(sim.states) if u < n_feds * per]
            if bad_rows:
                raise fault("non-finite parameters or optimizer state (finite losses, overflowing update)",
                            r + 1, bad_rows[0] // per, bad_rows[0] % per)
            records = [metrics.round_record(r + 1, pick(m, f), tcs[f], model_cfg, dt, n_models, active=active[f])
                       for f in range(n_feds)]
            for rec in records:
                if n_feds > 1:
                    rec["stacked_seeds"] = seeds  # dt is the round of every run of the program at once
                if r == start:
                    rec["includes_compile"] = True
            last = r + 1 == tc.rounds
            if (r + 1) % cfg.eval.every_rounds == 0 or last:
                bar.set_postfix_str("evaluating the test splits")  # one device call: no finer progress
                pre_eval = evaluate()  # local models before aggregation, as the reference
                ce = np.asarray(pre_eval["ce"]).reshape(n_feds, -1)
                if not np.isfinite(ce).all():
                    f, u = map(int, np.argwhere(~np.isfinite(ce))[0])
                    raise fault(f"non-finite test loss ({ce[f, u]})", r + 1, f, u)
                for f, rec in enumerate(records):
                    rec["test_ppl"] = np.exp(ce[f]).tolist()
            sim.aggregate()
            for f, (w, rec) in enumerate(zip(writers, records)):
                if sim.ranks is not None:  # each user's expert LoRA rank after the round (HetLoRA's cuts)
                    rec["expert_ranks"] = [int(x) for x in sim.ranks.current[f * per:f * per + n_models]]
                if sim.last_mixing is not None:  # PCL: this round's validation perplexities and mixing weights
                    rec["pcl"] = {k: v if k == "round" else (v[f] if n_feds > 1 else v[0])
                                  for k, v in sim.last_mixing.items()}
                w.write(rec)
            bar.set_postfix(loss=f"{np.mean(records[0]['train_ce']):.3f}", tok_s=f"{records[0]['tokens_per_s']:,.0f}")
            stopping = not last and stop.requested()
            if (r + 1) % cfg.checkpoint.every_rounds == 0 or last or stopping:
                host = sim.host_state()
                for f, run in enumerate(runs):  # each run's checkpoint as its own program writes it
                    meta = {"host": _run_host_state(sim, host, f, run_layout), "round": r + 1,
                            "identity": run.identity}
                    if last:  # the results need the pre-aggregation evaluation, which the state cannot give back
                        meta["pre_eval"] = encode_eval(pick(pre_eval, f))
                    run.ckpts.save(r + 1, sim.states if n_feds == 1 else sim.federation_states(f, run_layout), meta)
                saved = r + 1
            if stopping:
                bar.close()
                sig = signal.Signals(stop.signum).name if stop.signum else "a signal on another process"
                dirs = ", ".join(run.ckpts.directory for run in runs) if n_feds <= 4 else f"checkpoints/ of {where}"
                raise Stopped(f"stopped by {sig} at the end of round {r + 1} of {tc.rounds}; checkpoint"
                              f"{'s' if n_feds > 1 else ''} of round {r + 1} written to {dirs}", stop.signum,
                              r + 1, tc.rounds, runs[0].ckpts.directory)
    bar.close()
    written = [None] * n_feds  # resumed finished runs whose outputs were written: their results
    if pre_eval is None:  # resumed finished runs: their last checkpoint is post-aggregation
        kept = [_read_results(run, meta) for run, meta in zip(runs, metas)]
        written = [res for res, _ in kept]
        if all(res is not None for res in written):
            return written
        log(f"[{name}] the run had finished; writing its outputs")
    post_eval = evaluate() if not method.one_round else pre_eval
    out = []
    for f, (run, w) in enumerate(zip(runs, writers)):
        if written[f] is not None:
            out.append(written[f])
            continue
        pre = pick(pre_eval, f) if pre_eval is not None else kept[f][1]
        post = pick(post_eval, f) if not method.one_round else pre
        records = w.read()
        comm = _communication(run.cfg, sim, records, n_models)
        results = metrics.results(run.cfg, sim.method, run.seed, data, model_cfg, pre, post, records=records,
                                  zero_shot=zero_shot[f], communication=comm)
        if cfg.output.figures:
            plot.run_figures(run.run_dir, results, records, sim if n_feds == 1 else _FederationView(sim, f), data,
                             cfg.output.routing_tokens, write=distributed.is_main_process())
        if distributed.is_main_process():
            metrics.write_results(run.run_dir, results)  # last: results.json marks a complete run
        w.finish(results)  # W&B (output.wandb): the run's summary, and its files complete
        out.append(results)
    return out


def _read_results(run: _Run, meta: dict) -> tuple[dict | None, dict | None]:
    """(results.json, None) of a finished run; killed before results.json was written: (None, the
    pre-aggregation evaluation saved with its last checkpoint), to write its outputs from."""
    try:
        with open(os.path.join(run.run_dir, "results.json")) as f:
            return json.load(f), None
    except (OSError, ValueError):
        if "pre_eval" not in meta:
            raise WorkdirError(f"{run.run_dir} holds a finished run without results.json whose last checkpoint "
                               "predates the saved evaluation; rerun with --config.resume=False") from None
        return None, decode_eval(meta["pre_eval"])


class _FederationView:
    """One federation of a stacked Simulation, as plot.run_figures reads a Simulation."""

    def __init__(self, sim, f: int):
        self._sim, self._f = sim, f
        per = sim.layout.models_per_federation
        self.masks = sim.masks[f * per:(f + 1) * per]

    def user_params(self, user: int):
        return self._sim.user_params(user, self._f)

    def __getattr__(self, name):
        return getattr(self._sim, name)


def _zero_shot(run_dir: str, ev: dict | None) -> np.ndarray | None:
    """Per-user test CE of the base alone: `ev`, the run's evaluation of the state before round 1
    (every adapter's B is 0, so the model is the frozen base, whatever the method), kept in
    run_dir/zero_shot.json for a resumed run; ev=None (resumed): read back from there, None when
    the run started without eval.zero_shot."""
    path = os.path.join(run_dir, "zero_shot.json")
    if ev is None:
        try:
            with open(path) as f:
                return np.asarray(json.load(f)["ce"], np.float64)
        except (OSError, ValueError, KeyError):
            return None  # started before eval.zero_shot was set: nothing to recover without the base state
    ce = np.asarray(ev["ce"], np.float64)
    if distributed.is_main_process():
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"ce": ce.tolist()}, f)
        os.replace(tmp, path)
    return ce


# ----------------------------------------------------------------------------- every run
@dataclasses.dataclass
class _Prepared:
    """What every run of a config shares: its methods' layouts, the users' data, the base."""
    cfg: ConfigDict
    layouts: dict  # {(method, n_federations): Layout}
    data: object
    base_cfg: object
    base: dict

    def layout_of(self, method: str):
        def of(n_feds: int) -> Layout:
            if (method, n_feds) not in self.layouts:
                self.layouts[method, n_feds] = layouts_of(self.cfg, [method], n_feds)[method]
            return self.layouts[method, n_feds]
        return of


def _resolve(config) -> ConfigDict:
    """A validated, resolved copy of `config` (ConfigError before any data, base or compile work)."""
    cfg = config.copy_and_resolve_references()
    configuration.validate(cfg)
    cfg.data.min_tokens = max(cfg.data.min_tokens, cfg.train.seq_len + 1)
    return cfg


def _prepare(cfg, workdirs: list[str], n_federations: int = 1) -> _Prepared:
    """Lay the users out, load the data (each process only its own users) and the base once;
    hosts.json (which process held which users) in each of `workdirs`. n_federations > 1: runs
    stacked as up to that many federations, in programs of any size up to it (the runs that
    resume from one round), so each process loads the users of its rows in each of those layouts."""
    methods = configuration.methods_of(cfg)
    for wd in workdirs:
        make_workdir(wd)
    layouts = {(m, g): lay for g in range(1, n_federations + 1) for m, lay in layouts_of(cfg, methods, g).items()}
    directory = base_dir(cfg, log)  # a GGUF base is converted here, before its tokenizer is needed
    data_cfg = cfg.data.copy_and_resolve_references()  # data.tokenizer="base" resolved; the identity keeps "base"
    data_cfg.tokenizer = base_tokenizer(cfg, directory)
    try:  # bad data or an unusable base: one line, no traceback
        data = load_user_data(data_cfg, user_indices=data_users(layouts.values()))
    except (DataSourceError, InsufficientDataError) as e:
        raise DataError(first_line(e)) from e
    data.info.setdefault("tokenizer", data_cfg.tokenizer)
    hosts = distributed.gather_json({"process": jax.process_index(),
                                     "devices": [str(d) for d in jax.local_devices()],
                                     "users": list(map(int, data.indices)),
                                     "tokens": [[len(a), len(b), len(c)] for a, b, c in
                                                zip(data.train, data.valid, data.test)]})
    data = distributed.global_user_view(data, cfg.data.n_users)
    base_cfg, base = load_base(cfg, data.vocab_size, log=log, directory=directory)
    try:  # every token id indexes the base's vocabulary (else one line naming the file, or user and split)
        check_token_ids(data, base_cfg.vocab_size)
    except ValueError as e:
        hint = "" if data_cfg.tokenizer == cfg.data.tokenizer == "base" or cfg.data.source == "synthetic" else \
            f" (data.tokenizer={cfg.data.tokenizer!r}; 'base' tokenises with the base's own tokenizer)"
        raise DataError(str(e) + hint) from None
    if distributed.is_main_process():
        for wd in workdirs:
            with open(os.path.join(wd, "hosts.json"), "w") as f:
                json.dump(hosts, f, indent=1)
    return _Prepared(cfg, layouts, data, base_cfg, base)


def _compare(cfg, workdir: str, results: dict) -> None:
    """WORKDIR/comparison.* of a config's runs (several methods or seeds)."""
    table = metrics.comparison(list(results.values()))
    if distributed.is_main_process():
        metrics.write_comparison(workdir, table)
        if cfg.output.figures:
            plot.comparison_figure(workdir, table)
    log(metrics.comparison_markdown(table))


def run(config, workdir: str) -> dict:
    """Train and evaluate every (method, seed) of `config` in `workdir`; returns
    {(method, seed): results} (each what its results.json holds).

    Raises comigs_jax.errors.ConfigError before any data, base or compile work, WorkdirError,
    DataError, BaseModelError, CheckpointError or NumericalFault (one-line messages), and Stopped
    when a signal stopped the run after a checkpoint. `config` is not modified. In a
    multi-process run, comigs_jax.distributed.initialize must have run first."""
    cfg = _resolve(config)
    compilation_cache.configure(cfg)  # JAX's persistent cache (output.compilation_cache), before any compile
    methods, seeds = configuration.methods_of(cfg), configuration.seeds_of(cfg)
    stack = bool(cfg.federation.get("stack_seeds")) and len(seeds) > 1
    prep = _prepare(cfg, [workdir], len(seeds) if stack else 1)
    n_runs = len(methods) * len(seeds)
    out = {}
    for method in methods:
        runs = [_Run(cfg, s, run_dir_of(workdir, method, s, n_runs), f"seed {s}") for s in seeds]
        for run_, res in zip(runs, train_runs(method, runs, prep.data, prep.base_cfg, prep.base,
                                              prep.layout_of(method), stack)):
            out[method, run_.seed] = res
            log(metrics.results_markdown(res))
    if n_runs > 1:
        _compare(cfg, workdir, out)
    log(f"outputs in {os.path.abspath(workdir)}")
    return out


def run_cells(cells: list[tuple]) -> list[dict]:
    """Several configs ("cells" of a hyper-parameter grid: [(config, workdir), ...]) that differ
    only in FEDERATION_KEYS (seeds, train.lr / router_lr / lb_weight / weight_decay /
    prune_lambda), trained as ONE program per method: every (cell, seed) a federation. Each
    workdir gets what experiment.run(config, workdir) writes (and either resumes the other's);
    returns each cell's {(method, seed): results}. ConfigError (one line) before any work for
    cells that differ in another key."""
    cfgs = [_resolve(c) for c, _ in cells]
    if not cfgs:
        return []
    first = identity_lib.flat_config(cfgs[0])
    for (_, wd), c in zip(cells, cfgs):
        flat = identity_lib.flat_config(c)
        diff = sorted(k for k in set(first) | set(flat) if first.get(k) != flat.get(k)
                      and k not in configuration.FEDERATION_KEYS)
        if diff:
            k = diff[0]
            raise ConfigError(f"cell {wd}: config.{k} differs from the first cell's ({first.get(k)!r}, "
                              f"{flat.get(k)!r}); cells of one program may differ only in "
                              f"{', '.join(configuration.FEDERATION_KEYS)}")
    cfg = cfgs[0]
    n_runs = [len(configuration.methods_of(c)) * len(configuration.seeds_of(c)) for c in cfgs]
    prep = _prepare(cfg, [wd for _, wd in cells], sum(len(configuration.seeds_of(c)) for c in cfgs))
    out = [{} for _ in cells]
    for method in configuration.methods_of(cfg):
        runs, where = [], []
        for i, ((_, wd), c) in enumerate(zip(cells, cfgs)):
            for s in configuration.seeds_of(c):
                runs.append(_Run(c, s, run_dir_of(wd, method, s, n_runs[i]), f"{os.path.basename(wd)} seed {s}"))
                where.append(i)
        log(f"[{method}] {len(runs)} runs ({len(cells)} cells x seeds) as federations of one program")
        for i, run_, res in zip(where, runs, train_runs(method, runs, prep.data, prep.base_cfg, prep.base,
                                                       prep.layout_of(method), stack=True)):
            out[i][method, run_.seed] = res
    for (_, wd), c, res, n in zip(cells, cfgs, out, n_runs):
        if n > 1:
            _compare(c, wd, res)
    return out
