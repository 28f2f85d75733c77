"""Train and evaluate CoMiGS (or any method) on a federation of users; compare methods.

    python -m experiments.run                                        # the demo (configs/demo.py)
    python -m experiments.run --config=configs/slimpajama.py:comigs --workdir=runs/sp
    python -m experiments.run --config.methods=local,fedavg,pfedmoe,comigs --config.seeds=0,1

One run per (method, seed) in WORKDIR/<method>_s<seed>/: config.json, metrics.jsonl,
results.json, results.md, checkpoints/, figures. Several runs also write WORKDIR/comparison.*.
Running the same command again resumes every run from its latest checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEMO = os.path.join(_REPO, "configs", "demo.py")
FLAGS = flags.FLAGS


def define_flags() -> None:
    """--config (ml_collections, locked: a mistyped override fails) and --workdir. Defined at
    parse time, because config_flags applies the --config.* overrides while defining."""
    config_flags.DEFINE_config_file("config", _DEMO, "Experiment config file[:argument].", lock_config=True)
    flags.DEFINE_string("workdir", None, "Output directory (default: runs/<config name>[_<argument>]).")

# Keys that may change between a run and its resumption without making it another run.
_RESUMABLE_KEYS = ("resume", "output", "checkpoint", "methods", "seeds", "federation.mode", "federation.shard",
                   "distributed", "data.cache_dir", "data.use_cache", "data.progress")


def log(msg: str) -> None:
    """Print on process 0 only (the other processes of a multi-host run log nothing but errors)."""
    if "jax" in sys.modules and sys.modules["jax"].process_index() != 0:
        return
    print(msg, flush=True)


def is_main() -> bool:
    import jax
    return jax.process_index() == 0


# ----------------------------------------------------------------------------- config identity
def _flat_config(cfg) -> dict:
    out = {}

    def walk(d, prefix):
        for k, v in d.items():
            key = f"{prefix}{k}"
            if hasattr(v, "items"):
                walk(v, key + ".")
            else:
                out[key] = v
    walk(cfg.to_dict(), "")
    return out


def run_identity(cfg, method: str, seed: int) -> dict:
    """The config values that define a run (what must match to resume it)."""
    flat = {k: v for k, v in _flat_config(cfg).items()
            if not any(k == r or k.startswith(r + ".") for r in _RESUMABLE_KEYS)}
    flat["method"], flat["seed"] = method, seed
    return flat


def check_workdir(run_dir: str, identity: dict, resume: bool) -> bool:
    """True to resume. Refuses (SystemExit, one line) a workdir that holds another config's run."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        return False
    try:
        with open(path) as f:
            old = json.load(f)["identity"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: {path} cannot be read ({type(e).__name__}), so this workdir's run is unknown; "
                         "use another --workdir") from None
    diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
    if diff:
        k = diff[0]
        raise SystemExit(f"error: {run_dir} holds a run of another config ({k}: {old.get(k)!r} there, "
                         f"{identity.get(k)!r} now{f', and {len(diff) - 1} more' if len(diff) > 1 else ''}); "
                         "use another --workdir")
    return resume


# ----------------------------------------------------------------------------- base model
def load_base(cfg, data):
    """(GPT2Config, base params). base="pretrain": a small GPT-2 trained here on the synthetic
    general chain, cached in HF format and loaded back through the same loader as real GPT-2."""
    from comigs_jax.model.hf import CheckpointError, load_gpt2

    if cfg.base != "pretrain":
        return load_gpt2(cfg.base)
    import numpy as np

    from comigs_jax.data import general_stream
    from comigs_jax.model.config import GPT2Config
    from comigs_jax.model.hf import save_gpt2
    from comigs_jax.train.pretrain import pretrain

    p = cfg.pretrain
    key = json.dumps({"pretrain": p.to_dict(), "synthetic": cfg.data.synthetic.to_dict(),
                      "seq_len": cfg.train.seq_len, "data_seed": cfg.data.seed, "v": 1}, sort_keys=True)
    ckpt = os.path.join(os.path.expanduser(cfg.data.cache_dir), "bases",
                        "pretrained-" + hashlib.sha256(key.encode()).hexdigest()[:16])
    damaged = False
    if os.path.exists(ckpt):
        try:
            return load_gpt2(ckpt)
        except CheckpointError as e:  # a cache: rebuilt, never used damaged, never a dead end
            log(f"warning: the cached base cannot be loaded ({str(e).splitlines()[0]}); pretraining it again")
            damaged = True
    base_cfg = GPT2Config(vocab_size=data.vocab_size, n_positions=cfg.train.seq_len, n_embd=p.n_embd,
                          n_layer=p.n_layer, n_head=p.n_head)
    stream = general_stream(cfg.data, p.tokens, seed=cfg.data.seed)
    log(f"pretraining a {p.n_layer}-layer, {p.n_embd}-wide GPT-2 base on {len(stream):,} tokens of the "
        f"general chain ({p.steps} steps) -> {ckpt}")
    t0 = time.time()
    params, hist = pretrain(base_cfg, np.asarray(stream), steps=p.steps, batch_size=p.batch_size,
                            seq_len=cfg.train.seq_len, lr=p.lr, seed=cfg.data.seed)
    log(f"  pretraining loss {hist[0]:.3f} -> {hist[-1]:.3f} in {time.time() - t0:.1f} s")
    tmp = f"{ckpt}.tmp{os.getpid()}"  # one writer per folder; the rename is atomic
    shutil.rmtree(tmp, ignore_errors=True)
    save_gpt2(params, base_cfg, tmp)
    loaded = load_gpt2(tmp)  # through the same loader as real GPT-2 (a copy in memory)
    if damaged:
        shutil.rmtree(ckpt, ignore_errors=True)
    try:
        os.replace(tmp, ckpt)
    except OSError:  # another process (same seed, same base) got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return loaded


# ----------------------------------------------------------------------------- reliability
class Stopped(Exception):
    """The run stopped cleanly on a signal after a checkpoint; args: (message, exit code)."""


class StopOnSignal:
    """While active (the round loop), SIGINT/SIGTERM set a flag instead of killing the process:
    the loop finishes the current round, writes a checkpoint and stops. A second signal, or one
    outside the loop, has the default effect (stop at once)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        self.signum = None
        try:
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        except ValueError:  # not the main thread: signals keep their default effect
            self._old = {}
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}
        return False

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second signal: the default effect, now
            signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
            os.kill(os.getpid(), signum)
            return
        self.signum = signum  # no printing here: a handler may interrupt a print (reentrant I/O)

    def requested(self) -> bool:
        """Whether any process was asked to stop (all processes agree, so all save and stop)."""
        import jax
        flag = self.signum is not None
        if jax.process_count() > 1:
            import numpy as np
            from jax.experimental import multihost_utils
            flag = bool(np.asarray(multihost_utils.process_allgather(np.array([flag]))).any())
        return flag


def resume_command() -> str:
    """The command line that resumes this run (without a --config.resume=False)."""
    args = [a for a in sys.argv[1:] if not a.startswith("--config.resume")]
    return " ".join(["python", "-m", "experiments.run", *map(shlex.quote, args)])


def first_nonfinite(m: dict, active) -> tuple | None:
    """(step, user, metric, value) of the earliest non-finite per-step metric ([users, steps, ...])
    of the users in `active`, or None."""
    import numpy as np
    order = {"loss": 0, "ce": 1, "lb": 2}
    hits = []
    for k, v in m.items():
        v = np.asarray(v)
        if v.ndim < 2 or not np.issubdtype(v.dtype, np.floating):
            continue
        flat = v.reshape(v.shape[0], v.shape[1], -1)
        bad = ~np.isfinite(flat).all(-1) & np.asarray(active, bool)[:, None]
        for u, st in np.argwhere(bad):
            x = flat[u, st]
            hits.append((int(st), int(u), order.get(k, 9), k, float(x[~np.isfinite(x)][0])))
    if not hits:
        return None
    st, u, _, k, x = min(hits)
    return st, u, k, x


def nonfinite_users(states) -> list[int]:
    """Users (leading axis) any of whose floating-point state is NaN or inf."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    leaves = [x for x in jax.tree_util.tree_leaves(states)
              if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim >= 1]
    if not leaves:
        return []
    ok = _finite_per_user(leaves)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        ok = multihost_utils.process_allgather(ok, tiled=True)
    return [int(u) for u in np.flatnonzero(~np.asarray(ok))]


def _finite_per_user(leaves):
    import jax
    import jax.numpy as jnp
    global _FINITE_FN
    if _FINITE_FN is None:
        _FINITE_FN = jax.jit(lambda ls: jnp.stack(
            [jnp.isfinite(x.reshape(x.shape[0], -1)).all(1) for x in ls]).all(0))
    return _FINITE_FN(leaves)


_FINITE_FN = None


def _numerical_fault(what: str, r: int, users: list[str], user: int | None, step: int | None, tc, cfg,
                     latest: int | None, ckpt_dir: str) -> SystemExit:
    where = f"round {r}" + (f", user {user} ({users[user]})" if user is not None else "") + \
        (f", step {step} of {tc.local_steps}" if step is not None else "")
    kept = f"the latest checkpoint is round {latest} in {ckpt_dir}" if latest else "no checkpoint was written yet"
    return SystemExit(f"error: {what} at {where}; stopped before aggregation, no checkpoint of this state was "
                      f"written ({kept}); lower train.lr (now {cfg.train.lr:g}) or check the data")


def encode_eval(ev: dict) -> dict:
    """An evaluation (numpy arrays) as exact JSON (kept in the final checkpoint)."""
    import numpy as np
    return {k: {"dtype": str(np.asarray(v).dtype), "shape": list(np.shape(v)), "data": np.ravel(v).tolist()}
            for k, v in ev.items()}


def decode_eval(blob: dict) -> dict:
    import numpy as np
    return {k: np.asarray(v["data"], dtype=v["dtype"]).reshape(v["shape"]) for k, v in blob.items()}


# ----------------------------------------------------------------------------- one run
def train_and_evaluate(cfg, method_name: str, seed: int, data, base_cfg, base, run_dir: str) -> dict:
    """One method, one seed: train, evaluate, checkpoint, write outputs. Returns results."""
    import numpy as np
    from tqdm import tqdm

    from comigs_jax import configuration, metrics
    from comigs_jax.checkpoint import CheckpointError, RunCheckpoints
    from comigs_jax.federated.methods import get_method
    from comigs_jax.federated.simulation import Simulation
    from experiments import plot

    method = get_method(method_name)
    identity = run_identity(cfg, method_name, seed)
    resume = check_workdir(run_dir, identity, cfg.resume)
    os.makedirs(run_dir, exist_ok=True)
    ckpts = RunCheckpoints(os.path.join(run_dir, "checkpoints"), cfg.checkpoint.max_to_keep)
    if not resume and cfg.resume and ckpts.all_rounds():
        resume = True  # checkpoints without a config.json: never wiped unasked (restore checks their identity)
    if not resume:
        ckpts.delete_all()
    if is_main():
        tmp = os.path.join(run_dir, "config.json.tmp")
        with open(tmp, "w") as f:  # atomic: a kill never leaves a half-written config.json
            json.dump({"identity": identity, "config": json.loads(cfg.to_json_best_effort())}, f, indent=1)
        os.replace(tmp, os.path.join(run_dir, "config.json"))

    model_cfg = configuration.model_config(cfg, base_cfg)
    tc = configuration.train_config(cfg)
    n_models = 1 if method.pooled_data else len(data.users)
    mesh = run_mesh(cfg, n_models)
    sim = Simulation(model_cfg, tc, method, base, data.train, data.valid,
                     expert_counts=configuration.expert_counts_of(cfg), seed=seed, mode=cfg.federation.mode,
                     mesh=mesh, weighting=cfg.federation.weighting, participation=cfg.federation.participation,
                     user_indices=data.indices, n_users=len(data.users))
    writer = metrics.MetricsWriter(os.path.join(run_dir, "metrics.jsonl") if is_main() else None)
    start, meta = None, {}
    if resume:
        try:
            found = ckpts.restore_latest(sim.states, identity, log=log)
        except CheckpointError as e:
            ckpts.close()  # orbax's threads end before the exit (else a teardown traceback follows the line)
            raise SystemExit(f"error: {e}") from None
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
               disable=not cfg.output.progress or not is_main(), dynamic_ncols=True, file=sys.stdout)
    pre_eval = None
    names = data.users if n_models == len(data.users) else ["the pooled model"]
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    saved = start
    with StopOnSignal() as stop:
        if start < tc.rounds:
            log(f"[{method_name} s{seed}] rounds {start + 1}..{tc.rounds} in {run_dir} (SIGINT/SIGTERM: stop "
                "after the current round with a checkpoint)")
        for r in bar:
            t0 = time.perf_counter()
            m = sim.run_round()
            dt = time.perf_counter() - t0
            # numerical faults: stop before the poisoned state is aggregated or checkpointed
            active = np.asarray(sim.active)[np.asarray(sim.real)][:n_models]
            bad = first_nonfinite(m, active)
            if bad is not None:
                st, u, k, x = bad
                ckpts.close()
                raise _numerical_fault(f"non-finite training metric {k} ({x})", r + 1, names, u, st + 1, tc, cfg,
                                       saved, ckpt_dir)
            bad_users = [u for u in nonfinite_users(sim.states) if u < n_models]
            if bad_users:
                ckpts.close()
                raise _numerical_fault("non-finite parameters or optimizer state (finite losses, "
                                       "overflowing update)", r + 1, names, bad_users[0], None, tc, cfg, saved,
                                       ckpt_dir)
            record = metrics.round_record(r + 1, m, sim.tc, model_cfg, dt, n_models, active=active)
            if r == start:
                record["includes_compile"] = True
            last = r + 1 == tc.rounds
            if (r + 1) % cfg.eval.every_rounds == 0 or last:
                pre_eval = evaluate()  # local models before aggregation, as the reference
                ce = np.asarray(pre_eval["ce"])
                if not np.isfinite(ce).all():
                    u = int(np.flatnonzero(~np.isfinite(ce))[0])
                    ckpts.close()
                    raise _numerical_fault(f"non-finite test loss ({ce[u]})", r + 1, names, u, None, tc, cfg,
                                           saved, ckpt_dir)
                record["test_ppl"] = np.exp(pre_eval["ce"]).tolist()
            sim.aggregate()
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
                ckpts.close()
                name = signal.Signals(stop.signum).name if stop.signum else "a signal on another process"
                raise Stopped(f"stopped by {name} at the end of round {r + 1} of {tc.rounds}; checkpoint of "
                              f"round {r + 1} written to {ckpt_dir}; resume with: {resume_command()}",
                              128 + (stop.signum or signal.SIGTERM))
    bar.close()
    results_path = os.path.join(run_dir, "results.json")
    if pre_eval is None:  # resumed a finished run: its last checkpoint is post-aggregation
        try:
            with open(results_path) as f:
                return json.load(f)
        except (OSError, ValueError):  # killed before results.json was written: finish the outputs
            if "pre_eval" not in meta:
                raise SystemExit(f"error: {run_dir} holds a finished run without results.json whose last "
                                 "checkpoint predates the saved evaluation; rerun with --config.resume=False") from None
            pre_eval = decode_eval(meta["pre_eval"])
            log(f"[{method_name} s{seed}] the run had finished; writing its outputs")
    post_eval = evaluate() if not method.one_round else pre_eval
    results = metrics.results(cfg, method, seed, data, model_cfg, pre_eval, post_eval, records=writer.read())
    if cfg.output.figures:
        plot.run_figures(run_dir, results, writer.read(), sim, data, cfg.output.routing_tokens, write=is_main())
    if is_main():
        metrics.write_results(run_dir, results)  # last: results.json marks a complete run
    ckpts.close()
    return results


# ----------------------------------------------------------------------------- placement
def run_mesh(cfg, n_models: int):
    """The `users` mesh over every device of every process (None: one device, no sharding).
    Several processes always shard: that is how each holds only its own users."""
    import jax

    from comigs_jax.federated.sharding import users_mesh
    if jax.process_count() > 1:
        return users_mesh()
    if cfg.federation.shard and cfg.federation.mode == "vmap" and n_models > 1 and jax.device_count() > 1:
        return users_mesh()
    return None


def users_of_this_process(cfg, methods) -> list[int]:
    """The users whose data this process must load: those on its devices for every method to
    run (Centralized's one model needs every user's data on the process that holds it)."""
    import jax

    from comigs_jax.federated.methods import get_method
    from comigs_jax.federated.sharding import local_user_rows
    from comigs_jax.federated.users import padded_user_count
    n = cfg.data.n_users
    if jax.process_count() == 1:
        return list(range(n))
    mine = set()
    for name in methods:
        n_models = 1 if get_method(name).pooled_data else n
        mesh = run_mesh(cfg, n_models)
        rows = local_user_rows(mesh, padded_user_count(n_models, mesh.devices.size))
        mine |= set(range(n)) if (n_models == 1 and 0 in rows) else {r for r in rows if r < n}
        # every process scores its own users' test splits, whatever the method
        mine |= {r for r in local_user_rows(mesh, padded_user_count(n, mesh.devices.size)) if r < n}
    # A process whose devices hold only padding users still loads one user (user 0): it learns
    # the data's vocabulary and dtype from it, and never trains on it.
    return sorted(mine) or [0]


# ----------------------------------------------------------------------------- main
def default_workdir() -> str:
    """runs/<config file stem>[_<argument>], from the --config flag as typed."""
    spec, args = _DEMO, sys.argv[1:]
    for i, a in enumerate(args):
        if a.startswith("--config="):
            spec = a.split("=", 1)[1]
        elif a == "--config" and i + 1 < len(args):
            spec = args[i + 1]
    path, _, arg = spec.partition(":")
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join("runs", f"{stem}_{arg}" if arg else stem)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax and absl report every checkpoint step at INFO
    from comigs_jax import configuration

    cfg = FLAGS.config
    try:
        configuration.validate(cfg)
    except configuration.ConfigError as e:
        raise SystemExit(f"error: {e}")
    methods, seeds = configuration.methods_of(cfg), configuration.seeds_of(cfg)
    workdir = FLAGS.workdir or default_workdir()
    from comigs_jax import distributed
    multi = distributed.initialize(cfg.distributed)  # before any JAX computation; no-op for one process
    # a CleanStop is agreed by every process: the normal exit, through the shutdown barrier
    return distributed.run_or_exit(lambda: run_all(cfg, methods, seeds, workdir), multi, clean=(CleanStop,))


class CleanStop(SystemExit):
    """A stop that every process agreed on (a signal), after a checkpoint."""


def run_all(cfg, methods, seeds, workdir) -> None:
    """Load the data and the base once, then train and evaluate every (method, seed)."""
    from comigs_jax import distributed, metrics
    from comigs_jax.data import DataSourceError, InsufficientDataError, load_user_data
    from comigs_jax.data.reference_bins import check_token_ids
    from comigs_jax.model.hf import CheckpointError as BaseCheckpointError

    cfg.data.min_tokens = max(cfg.data.min_tokens, cfg.train.seq_len + 1)
    try:  # bad data or an unusable base: one line, no traceback
        data = load_user_data(cfg.data, user_indices=users_of_this_process(cfg, methods))
        data.info.setdefault("tokenizer", cfg.data.tokenizer)
        import jax
        hosts = distributed.gather_json({"process": jax.process_index(),
                                         "devices": [str(d) for d in jax.local_devices()],
                                         "users": list(map(int, data.indices)),
                                         "tokens": [[len(a), len(b), len(c)] for a, b, c in
                                                    zip(data.train, data.valid, data.test)]})
        data = distributed.global_user_view(data, cfg.data.n_users)
        base_cfg, base = load_base(cfg, data)
    except (DataSourceError, InsufficientDataError, BaseCheckpointError) as e:
        raise SystemExit(f"error: {str(e).strip().splitlines()[0]}") from None
    try:  # every token id indexes the base's vocabulary (else one line naming the file, or user and split)
        check_token_ids(data, base_cfg.vocab_size)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if is_main():  # which process held which users' data (each loads only its own)
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "hosts.json"), "w") as f:
            json.dump(hosts, f, indent=1)
    all_results = []
    for method in methods:
        for seed in seeds:
            run_dir = workdir if len(methods) * len(seeds) == 1 else os.path.join(workdir, f"{method}_s{seed}")
            try:
                res = train_and_evaluate(cfg, method, seed, data, base_cfg, base, run_dir)
            except Stopped as e:
                log(e.args[0])
                raise CleanStop(e.args[1]) from None
            all_results.append(res)
            log(metrics.results_markdown(res))
    if len(all_results) > 1:
        from experiments import plot
        table = metrics.comparison(all_results)
        if is_main():
            metrics.write_comparison(workdir, table)
            if cfg.output.figures:
                plot.comparison_figure(workdir, table)
        log(metrics.comparison_markdown(table))
    log(f"outputs in {os.path.abspath(workdir)}")


def _config_spec(argv) -> str:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return _DEMO


def parse_flags(argv) -> list[str]:
    """Parse flags; a missing config file or a bad override is one clear line (SystemExit)."""
    path = _config_spec(argv).partition(":")[0]
    if not os.path.isfile(path):
        raise SystemExit(f"error: config file {path!r} not found (see configs/ for the experiment configs)")
    try:
        define_flags()
        rest = FLAGS(argv)
        FLAGS.config  # loads the file and applies the --config.* overrides
    except AttributeError as e:  # ml_collections: an override of a key the config does not have
        key = str(e).strip("\"'")
        bad = next((a.split("=")[0] for a in argv if a.startswith("--config.") and key in a), key)
        raise SystemExit(f"error: {bad}: unknown config key {key!r} (every key is in configs/base.py)") from None
    except (flags.Error, ValueError, TypeError, KeyError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SystemExit(f"error: {first}") from None
    return rest


def _drop_abandoned_read_callbacks() -> None:
    """When orbax cannot read a checkpoint, the tensorstore reads it abandoned finish later and
    call back into an asyncio loop that is already closed; Python reports each of those as an
    unraisable RuntimeError, dozens of tracebacks around the run's one-line error. Only that
    exception is dropped; every other unraisable exception is reported as usual."""
    default = sys.unraisablehook

    def hook(u):
        if isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed":
            return
        default(u)

    sys.unraisablehook = hook


if __name__ == "__main__":
    _drop_abandoned_read_callbacks()
    import faulthandler
    # `kill -USR1 <pid>` prints every thread's Python stack to stderr: how a stalled multi-process
    # run shows where each process waits (the run goes on).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    app.run(main, flags_parser=parse_flags)
