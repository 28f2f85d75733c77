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

import errno
import json
import os
import signal
import sys
import time

import jax
import numpy as np
from tqdm import tqdm

from comigs_jax import configuration, distributed
from comigs_jax.data import DataSourceError, InsufficientDataError, load_user_data
from comigs_jax.data.reference_bins import check_token_ids
from comigs_jax.errors import DataError, Stopped, WorkdirError
from comigs_jax.experiment import identity as identity_lib
from comigs_jax.experiment import metrics, numerics, plot
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


# ----------------------------------------------------------------------------- one run
def train_and_evaluate(cfg, method_name: str, seed: int, data, base_cfg, base, run_dir: str, layout: Layout) -> dict:
    """One method, one seed: train, evaluate, checkpoint, write outputs. Returns its results."""
    method = get_method(method_name)
    identity = identity_lib.run_identity(cfg, method_name, seed)
    resume = identity_lib.check_workdir(run_dir, identity, cfg.resume)
    make_workdir(run_dir)
    with RunCheckpoints(os.path.join(run_dir, "checkpoints"), cfg.checkpoint.max_to_keep) as ckpts:
        if not resume and cfg.resume and ckpts.all_rounds():
            resume = True  # checkpoints without a config.json: never wiped unasked (restore checks their identity)
        if not resume:
            ckpts.delete_all()
        if distributed.is_main_process():
            identity_lib.write_config_json(run_dir, identity, cfg)
        return _train_and_evaluate(cfg, method, seed, data, base_cfg, base, run_dir, layout, identity, resume, ckpts)


def _train_and_evaluate(cfg, method, seed, data, base_cfg, base, run_dir, layout, identity, resume, ckpts) -> dict:
    method_name = method.name
    model_cfg = configuration.model_config(cfg, base_cfg)
    tc = configuration.train_config(cfg)
    n_models = layout.n_models
    sim = _simulation(cfg, model_cfg, tc, method, base, data, layout, seed=seed)
    writer = metrics.MetricsWriter(os.path.join(run_dir, "metrics.jsonl") if distributed.is_main_process() else None,
                                   tensorboard=cfg.output.get("tensorboard", False), users=data.users)
    start, meta = None, {}
    if resume:
        found = ckpts.restore_latest(sim.states, identity, log=log)
        if found is not None:
            start, sim.states, meta = found
    if start is not None:
        sim.restore_host_state(meta["host"])
        writer.truncate(start)
        log(f"[{method_name} s{seed}] resumed from round {start} ({run_dir})")
    else:
        writer.truncate(0)
        start = 0

    evaluate = lambda: sim.evaluate(data.test, cfg.eval.n_windows, cfg.eval.batch_size, cfg.eval.protocol, seed)
    bar = tqdm(range(start, tc.rounds), desc=f"{method_name} s{seed}", initial=start, total=tc.rounds,
               disable=not cfg.output.progress or not distributed.is_main_process(), dynamic_ncols=True,
               file=sys.stdout)
    zero_shot = _zero_shot(run_dir, evaluate, fresh=start == 0) if cfg.eval.get("zero_shot") else None
    pre_eval = None
    names = data.users if n_models == len(data.users) else ["the pooled model"]
    ckpt_dir = ckpts.directory
    saved = start

    def fault(what, r, user=None, step=None):
        return numerics.fault(what, r, names, user, step, tc.local_steps, cfg.train.lr, saved, ckpt_dir)

    def second_signal(signum):
        kept = f"the last complete checkpoint is round {saved} in {ckpt_dir}" if saved else "no checkpoint was written"
        return (f"stopped at once by a second {signal.Signals(signum).name} ({kept}); running the same command "
                "resumes from it")

    with StopOnSignal(second_signal) as stop:
        if start < tc.rounds:
            log(f"[{method_name} s{seed}] rounds {start + 1}..{tc.rounds} in {run_dir} (SIGINT/SIGTERM: stop "
                "after the current round with a checkpoint; a second one: at once)")
        for r in bar:
            t0 = time.perf_counter()
            m = sim.run_round()
            dt = time.perf_counter() - t0
            # numerical faults: stop before the poisoned state is aggregated or checkpointed
            active = np.asarray(sim.active)[np.asarray(sim.real)][:n_models]
            bad = numerics.first_nonfinite(m, active)
            if bad is not None:
                st, u, k, x = bad
                raise fault(f"non-finite training metric {k} ({x})", r + 1, u, st + 1)
            bad_users = [u for u in numerics.nonfinite_users(sim.states) if u < n_models]
            if bad_users:
                raise fault("non-finite parameters or optimizer state (finite losses, overflowing update)",
                            r + 1, bad_users[0])
            record = metrics.round_record(r + 1, m, sim.tc, model_cfg, dt, n_models, active=active)
            if r == start:
                record["includes_compile"] = True
            last = r + 1 == tc.rounds
            if (r + 1) % cfg.eval.every_rounds == 0 or last:
                bar.set_postfix_str("evaluating the test splits")  # one device call: no finer progress
                pre_eval = evaluate()  # local models before aggregation, as the reference
                ce = np.asarray(pre_eval["ce"])
                if not np.isfinite(ce).all():
                    u = int(np.flatnonzero(~np.isfinite(ce))[0])
                    raise fault(f"non-finite test loss ({ce[u]})", r + 1, u)
                record["test_ppl"] = np.exp(pre_eval["ce"]).tolist()
            sim.aggregate()
            if sim.ranks is not None:  # each user's expert LoRA rank after the round (HetLoRA's cuts)
                record["expert_ranks"] = [int(x) for x in sim.ranks.current[:n_models]]
            if sim.last_mixing is not None:  # PCL: this round's validation perplexities and mixing weights
                record["pcl"] = {k: v if k == "round" else v[0] for k, v in sim.last_mixing.items()}
            writer.write(record)
            bar.set_postfix(loss=f"{np.mean(record['train_ce']):.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")
            stopping = not last and stop.requested()
            if (r + 1) % cfg.checkpoint.every_rounds == 0 or last or stopping:
                meta = {"host": sim.host_state(), "round": r + 1, "identity": identity}
                if last:  # the results need the pre-aggregation evaluation, which the state cannot give back
                    meta["pre_eval"] = encode_eval(pre_eval)
                ckpts.save(r + 1, sim.states, meta)
                saved = r + 1
            if stopping:
                bar.close()
                name = signal.Signals(stop.signum).name if stop.signum else "a signal on another process"
                raise Stopped(f"stopped by {name} at the end of round {r + 1} of {tc.rounds}; checkpoint of "
                              f"round {r + 1} written to {ckpt_dir}", stop.signum, r + 1, tc.rounds, ckpt_dir)
    bar.close()
    results_path = os.path.join(run_dir, "results.json")
    if pre_eval is None:  # resumed a finished run: its last checkpoint is post-aggregation
        try:
            with open(results_path) as f:
                return json.load(f)
        except (OSError, ValueError):  # killed before results.json was written: finish the outputs
            if "pre_eval" not in meta:
                raise WorkdirError(f"{run_dir} holds a finished run without results.json whose last checkpoint "
                                   "predates the saved evaluation; rerun with --config.resume=False") from None
            pre_eval = decode_eval(meta["pre_eval"])
            log(f"[{method_name} s{seed}] the run had finished; writing its outputs")
    post_eval = evaluate() if not method.one_round else pre_eval
    records = writer.read()
    comm = _communication(cfg, sim, records, n_models)
    results = metrics.results(cfg, sim.method, seed, data, model_cfg, pre_eval, post_eval, records=records,
                              zero_shot=zero_shot, communication=comm)
    if cfg.output.figures:
        plot.run_figures(run_dir, results, writer.read(), sim, data, cfg.output.routing_tokens,
                         write=distributed.is_main_process())
    if distributed.is_main_process():
        metrics.write_results(run_dir, results)  # last: results.json marks a complete run
    return results


def train_and_evaluate_stacked(cfg, method_name: str, seeds: list[int], data, base_cfg, base, run_dirs: list[str],
                               layout: Layout, run_layout: Layout) -> list[dict] | None:
    """One method, every seed as a federation of ONE program (federation.stack_seeds): the same
    per-seed folders (config.json, metrics.jsonl, checkpoints/ in the separate run's layout
    `run_layout`, results, figures) as separate runs, which can resume them and vice versa.
    Returns None, and trains nothing, when any seed's run has checkpoints to resume from (the
    seeds then run separately, each from its own)."""
    method = get_method(method_name)
    identities = [identity_lib.run_identity(cfg, method_name, s) for s in seeds]
    for d, i in zip(run_dirs, identities):  # another config's run in a folder: WorkdirError
        identity_lib.check_workdir(d, i, cfg.resume)
    for d in run_dirs:
        make_workdir(d)
    ckpts = [RunCheckpoints(os.path.join(d, "checkpoints"), cfg.checkpoint.max_to_keep) for d in run_dirs]
    try:
        if cfg.resume and any(c.all_rounds() for c in ckpts):
            log(f"[{method_name}] seeds {seeds}: checkpoints to resume from; running the seeds separately")
            return None
        for d, i, c in zip(run_dirs, identities, ckpts):
            c.delete_all()
            if distributed.is_main_process():
                identity_lib.write_config_json(d, i, cfg)
        return _train_and_evaluate_stacked(cfg, method, seeds, data, base_cfg, base, run_dirs, layout, run_layout,
                                           identities, ckpts)
    finally:
        for c in ckpts:
            c.close()


def _simulation(cfg, model_cfg, tc, method, base, data, layout, **kw) -> Simulation:
    """The run's Simulation (kw: its seed, or the stacked seeds' federations)."""
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


def _federation_ranks(sim, host: dict, federation: int, run_layout) -> dict:
    """Federation `federation`'s current expert LoRA ranks (host state "ranks") in the row order of
    its own run (Simulation.federation_states' rows), for its checkpoint; {} without ranks."""
    if "ranks" not in host:
        return {}
    return {"ranks": [int(host["ranks"][i]) for i in sim.federation_rows(federation, run_layout)]}


def _train_and_evaluate_stacked(cfg, method, seeds, data, base_cfg, base, run_dirs, layout, run_layout, identities,
                                ckpts) -> list[dict]:
    n_feds, n_models = len(seeds), run_layout.n_models
    model_cfg, tc = configuration.model_config(cfg, base_cfg), configuration.train_config(cfg)
    sim = _simulation(cfg, model_cfg, tc, method, base, data, layout, federations=[{"seed": s} for s in seeds])
    writers = [metrics.MetricsWriter(os.path.join(d, "metrics.jsonl") if distributed.is_main_process() else None,
                                     tensorboard=cfg.output.get("tensorboard", False), users=data.users)
               for d in run_dirs]
    for w in writers:
        w.truncate(0)
    evaluate = lambda: sim.evaluate(data.test, cfg.eval.n_windows, cfg.eval.batch_size, cfg.eval.protocol, seeds)
    pick = lambda ev, f: {k: v[f] for k, v in ev.items()}
    name = f"{method.name} s{','.join(map(str, seeds))}"
    bar = tqdm(range(tc.rounds), desc=name, total=tc.rounds, file=sys.stdout, dynamic_ncols=True,
               disable=not cfg.output.progress or not distributed.is_main_process())
    zero_shot = [None] * n_feds
    if cfg.eval.get("zero_shot"):
        ev0 = evaluate()
        zero_shot = [_zero_shot(d, lambda f=f: pick(ev0, f), fresh=True) for f, d in enumerate(run_dirs)]
    names = data.users if n_models == len(data.users) else ["the pooled model"]
    saved, pre_eval = 0, None

    def fault(what, r, f, user=None, step=None):
        return numerics.fault(f"seed {seeds[f]}: {what}", r, names, user, step, tc.local_steps, cfg.train.lr, saved,
                              ckpts[f].directory)

    def second_signal(signum):
        kept = f"the last complete checkpoints are round {saved}" if saved else "no checkpoint was written"
        return (f"stopped at once by a second {signal.Signals(signum).name} ({kept}); running the same command "
                "resumes from them")

    with StopOnSignal(second_signal) as stop:
        log(f"[{name}] {n_feds} seeds as one program, rounds 1..{tc.rounds} in {', '.join(run_dirs)} "
            "(SIGINT/SIGTERM: stop after the current round with a checkpoint; a second one: at once)")
        for r in bar:
            t0 = time.perf_counter()
            m = sim.run_round()  # [F, U, steps, ...]
            dt = time.perf_counter() - t0
            active = np.asarray(sim.active)[np.asarray(sim.real)].reshape(n_feds, -1)
            for f in range(n_feds):
                bad = numerics.first_nonfinite(pick(m, f), active[f])
                if bad is not None:
                    st, u, k, x = bad
                    raise fault(f"non-finite training metric {k} ({x})", r + 1, f, u, st + 1)
            bad_rows = [u for u in numerics.nonfinite_users(sim.states) if u < n_feds * n_models]
            if bad_rows:
                raise fault("non-finite parameters or optimizer state (finite losses, overflowing update)",
                            r + 1, bad_rows[0] // n_models, bad_rows[0] % n_models)
            records = [metrics.round_record(r + 1, pick(m, f), sim.tc, model_cfg, dt, n_models, active=active[f])
                       for f in range(n_feds)]
            last = r + 1 == tc.rounds
            for rec in records:
                rec["stacked_seeds"] = list(seeds)  # dt is the round of every seed at once
                if r == 0:
                    rec["includes_compile"] = True
            if (r + 1) % cfg.eval.every_rounds == 0 or last:
                bar.set_postfix_str("evaluating the test splits")
                pre_eval = evaluate()
                ce = np.asarray(pre_eval["ce"])
                if not np.isfinite(ce).all():
                    f, u = map(int, np.argwhere(~np.isfinite(ce))[0])
                    raise fault(f"non-finite test loss ({ce[f, u]})", r + 1, f, u)
                for f, rec in enumerate(records):
                    rec["test_ppl"] = np.exp(pre_eval["ce"][f]).tolist()
            sim.aggregate()
            for f, (w, rec) in enumerate(zip(writers, records)):
                if sim.ranks is not None:  # this seed's users' expert LoRA ranks after the round
                    per = sim.layout.models_per_federation
                    rec["expert_ranks"] = [int(x) for x in sim.ranks.current[f * per:f * per + n_models]]
                if sim.last_mixing is not None:  # PCL: each seed's own perplexities and mixing weights
                    rec["pcl"] = {k: v if k == "round" else v[f] for k, v in sim.last_mixing.items()}
                w.write(rec)
            bar.set_postfix(loss=f"{np.mean(records[0]['train_ce']):.3f}")
            stopping = not last and stop.requested()
            if (r + 1) % cfg.checkpoint.every_rounds == 0 or last or stopping:
                host = sim.host_state()
                for f in range(n_feds):  # each seed's checkpoint as its separate run would write it
                    meta = {"host": {"round_index": host["round_index"], "rng": host["rng"][f],
                                     **_federation_ranks(sim, host, f, run_layout)}, "round": r + 1,
                            "identity": identities[f]}
                    if last:
                        meta["pre_eval"] = encode_eval(pick(pre_eval, f))
                    ckpts[f].save(r + 1, sim.federation_states(f, run_layout), meta)
                saved = r + 1
            if stopping:
                bar.close()
                sig = signal.Signals(stop.signum).name if stop.signum else "a signal on another process"
                raise Stopped(f"stopped by {sig} at the end of round {r + 1} of {tc.rounds}; checkpoints of "
                              f"round {r + 1} written to {', '.join(c.directory for c in ckpts)}", stop.signum,
                              r + 1, tc.rounds, ckpts[0].directory)
    bar.close()
    post_eval = evaluate() if not method.one_round else pre_eval
    out = []
    for f, (seed, d, w) in enumerate(zip(seeds, run_dirs, writers)):
        records = w.read()
        comm = _communication(cfg, sim, records, n_models)
        results = metrics.results(cfg, sim.method, seed, data, model_cfg, pick(pre_eval, f), pick(post_eval, f),
                                  records=records, zero_shot=zero_shot[f], communication=comm)
        if cfg.output.figures:
            plot.run_figures(d, results, records, _FederationView(sim, f), data, cfg.output.routing_tokens,
                             write=distributed.is_main_process())
        if distributed.is_main_process():
            metrics.write_results(d, results)
        out.append(results)
    return out


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


def _zero_shot(run_dir: str, evaluate, fresh: bool) -> np.ndarray | None:
    """Per-user test CE of the base alone: the state before round 1 (every adapter's B is 0, so
    the model is the frozen base, whatever the method), scored by the run's own evaluation
    program. Kept in run_dir/zero_shot.json for a resumed run; None when a resumed run has none."""
    path = os.path.join(run_dir, "zero_shot.json")
    if not fresh:
        try:
            with open(path) as f:
                return np.asarray(json.load(f)["ce"], np.float64)
        except (OSError, ValueError, KeyError):
            return None  # started before eval.zero_shot was set: nothing to recover without the base state
    ce = np.asarray(evaluate()["ce"], np.float64)
    if distributed.is_main_process():
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"ce": ce.tolist()}, f)
        os.replace(tmp, path)
    return ce


# ----------------------------------------------------------------------------- every run
def run(config, workdir: str) -> dict:
    """Train and evaluate every (method, seed) of `config` in `workdir`; returns
    {(method, seed): results} (each what its results.json holds).

    Raises comigs_jax.errors.ConfigError before any data, base or compile work, WorkdirError,
    DataError, BaseModelError, CheckpointError or NumericalFault (one-line messages), and Stopped
    when a signal stopped the run after a checkpoint. `config` is not modified. In a
    multi-process run, comigs_jax.distributed.initialize must have run first."""
    cfg = config.copy_and_resolve_references()
    configuration.validate(cfg)
    methods, seeds = configuration.methods_of(cfg), configuration.seeds_of(cfg)
    cfg.data.min_tokens = max(cfg.data.min_tokens, cfg.train.seq_len + 1)
    make_workdir(workdir)
    layouts = layouts_of(cfg, methods)
    directory = base_dir(cfg, log)  # a GGUF base is converted here, before its tokenizer is needed
    data_cfg = cfg.data.copy_and_resolve_references()  # data.tokenizer="base" resolved; the identity keeps "base"
    data_cfg.tokenizer = base_tokenizer(cfg, directory)
    try:  # bad data or an unusable base: one line, no traceback
        data = load_user_data(data_cfg, user_indices=data_users(layouts.values()))
    except (DataSourceError, InsufficientDataError) as e:
        raise DataError(str(e).strip().splitlines()[0]) from e
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
    if distributed.is_main_process():  # which process held which users' data (each loads only its own)
        with open(os.path.join(workdir, "hosts.json"), "w") as f:
            json.dump(hosts, f, indent=1)
    n_runs = len(methods) * len(seeds)
    stacked_layouts = layouts_of(cfg, methods, len(seeds)) if cfg.federation.get("stack_seeds") and len(seeds) > 1 \
        else None
    out = {}
    for method in methods:
        if stacked_layouts is not None:
            dirs = [run_dir_of(workdir, method, seed, n_runs) for seed in seeds]
            res = train_and_evaluate_stacked(cfg, method, seeds, data, base_cfg, base, dirs, stacked_layouts[method],
                                             layouts[method])
            if res is not None:
                for seed, r in zip(seeds, res):
                    out[method, seed] = r
                    log(metrics.results_markdown(r))
                continue
        for seed in seeds:
            res = train_and_evaluate(cfg, method, seed, data, base_cfg, base,
                                     run_dir_of(workdir, method, seed, n_runs), layouts[method])
            out[method, seed] = res
            log(metrics.results_markdown(res))
    if n_runs > 1:
        table = metrics.comparison(list(out.values()))
        if distributed.is_main_process():
            metrics.write_comparison(workdir, table)
            if cfg.output.figures:
                plot.comparison_figure(workdir, table)
        log(metrics.comparison_markdown(table))
    log(f"outputs in {os.path.abspath(workdir)}")
    return out
