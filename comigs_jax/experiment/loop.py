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
import functools
import json
import os

import jax
from ml_collections import ConfigDict

from comigs_jax import compilation_cache, configuration, distributed
from comigs_jax.data import DataSourceError, InsufficientDataError, load_user_data
from comigs_jax.data.reference_bins import check_token_ids
from comigs_jax.errors import ConfigError, DataError, WorkdirError, first_line
from comigs_jax.experiment import identity as identity_lib
from comigs_jax.experiment import metrics, outputs, program
from comigs_jax.experiment.base_model import base_dir, base_tokenizer, load_base
from comigs_jax.experiment.checkpoint import RunCheckpoints
from comigs_jax.experiment.log import log
from comigs_jax.experiment.signals import StopOnSignal
from comigs_jax.federated.layout import Layout, data_users
from comigs_jax.federated.methods import get_method


def layouts_of(cfg, methods, n_federations: int = 1) -> dict[str, Layout]:
    """One layout per method (Centralized's one model lays out differently), on the run's mesh;
    users in chunks of train.user_chunk in the vmapped mode (the loop runs one user at a time);
    n_federations: the runs stacked as federations of one program (federation.stack_seeds; 1: a run alone)."""
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
            run.ckpts = RunCheckpoints(os.path.join(run.run_dir, "checkpoints"), run.cfg.checkpoint.max_to_keep,
                                       async_save=run.cfg.checkpoint.get("async_save", True))
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
                except program.Regroup:  # a corrupt checkpoint set aside: a run resumes from an earlier round
                    break
                done.update({r.run_dir: res for r, res in zip(group, results)})
        return [done[r.run_dir] for r in runs]
    finally:  # every run's save in flight completes and its manager closes, whatever ended the loop
        _close_all([run.ckpts for run in runs if run.ckpts is not None])


def _close_all(ckpts: list[RunCheckpoints]) -> None:
    """Close each (waiting for its save in flight), even when one raises; then raise the first."""
    errors = []
    for c in ckpts:
        try:
            c.close()
        except Exception as e:  # noqa: BLE001 - the others must still finish their saves
            errors.append(e)
    if errors:
        raise errors[0]


def _groups(runs: list[_Run], stack: bool) -> list[list[_Run]]:
    """The programs to train: each run alone, or (stack) the runs by the round they resume from."""
    if not stack:
        return [[r] for r in runs]
    by_round = {}
    for r in runs:
        by_round.setdefault((r.ckpts.latest() or 0) if r.resume else 0, []).append(r)
    return list(by_round.values())


def _train_program(method, runs: list[_Run], data, base_cfg, base, layout: Layout, run_layout: Layout) -> list[dict]:
    """Runs of one method (one, or several resuming from the same round) as federations of ONE
    program (comigs_jax.experiment.program): restore, train, evaluate, checkpoint each as its own
    program would, write each run's outputs."""
    prog = program.open_program(method, runs, data, base_cfg, base, layout, run_layout)
    try:
        start, metas = program.restore_runs(prog)
        zero_shots = outputs.zero_shot(prog, start)
        with StopOnSignal(functools.partial(program.second_signal, prog)) as stop:
            pre_eval = program.train_rounds(prog, start, stop)
        return outputs.write_outputs(prog, pre_eval, metas, zero_shots)
    finally:  # TensorBoard's events on disk when the program ends, however it ends (not at collection)
        for w in prog.writers:
            w.close()


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
    hosts.json (which process held which users) in each of `workdirs`. n_federations: runs are
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
            from comigs_jax.experiment import plot  # matplotlib only when figures are drawn
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
    prune_lambda / prox_mu, server.lr), trained as ONE program per method: every (cell, seed) a federation. Each
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
