"""The users' models of a finished run, restored from its last checkpoint (for
`experiments.generate` and `experiments.export`).

    run = open_run("runs/demo", ["user0"])     # cheap checks first: finished run, known users
    rows = restore_rows(run)                   # the last checkpoint's trainable params, [U, ...]
    params, mask = run.user_params("user0", rows)

A user's model is its state in the run's last checkpoint: the base, and its adapters after the
final aggregation (the generalists averaged over the federation, its specialists and router its
own), which is the model the user keeps after the run. The base and its tokenizer come from the
run's config.json (`base`, `data.tokenizer`), the users' names from its results.json. Every bad
input (a workdir with no finished run, an unknown user, a pretrained base missing from the cache,
no checkpoint) is a RestoreError with one line, raised before anything is compiled.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable, Optional

import numpy as np

from comigs_jax.errors import ExperimentError


class RestoreError(ExperimentError):
    """A finished run's user models cannot be restored (one line: what, and what is allowed)."""


def find_run(workdir: str) -> str:
    """The folder of the workdir's finished run (its results.json); RestoreError otherwise."""
    if not os.path.isdir(workdir):
        raise RestoreError(f"workdir {workdir} does not exist")
    if os.path.exists(os.path.join(workdir, "results.json")):
        return workdir
    runs = sorted(d for d in os.listdir(workdir) if os.path.exists(os.path.join(workdir, d, "results.json")))
    if len(runs) == 1:
        return os.path.join(workdir, runs[0])
    if runs:
        raise RestoreError(f"workdir {workdir} holds {len(runs)} runs; pass one of them as --workdir: "
                           + ", ".join(os.path.join(workdir, d) for d in runs))
    raise RestoreError(f"workdir {workdir} holds no finished run (no results.json): finish it with "
                       "python -m experiments.run first")


def run_results(run_dir: str) -> dict:
    path = os.path.join(run_dir, "results.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise RestoreError(f"{path} cannot be read ({type(e).__name__}): the run's users are unknown") from None


def run_config(run_dir: str):
    """The run's config (config.json's "config") as a ConfigDict."""
    import ml_collections
    path = os.path.join(run_dir, "config.json")
    try:
        with open(path) as f:
            return ml_collections.ConfigDict(json.load(f)["config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RestoreError(f"{path} cannot be read ({type(e).__name__}); the run's config is unknown") from None


def check_users(users: list, wanted: Iterable[str]) -> None:
    for user in wanted:
        if user not in users:
            raise RestoreError(f"unknown user {user!r}: this run's users are {', '.join(users)}")


@dataclasses.dataclass
class FinishedRun:
    """A finished run's shared parts: its config, method, model config, base and users."""

    run_dir: str
    cfg: object  # the run's ConfigDict
    method: object  # comigs_jax.federated.methods.Method
    users: list  # names, in results.json's order
    model_cfg: object  # the trained model's config (adapters; float32, no remat)
    base_cfg: object  # the base's config (no adapters)
    base: dict  # the base's params (host arrays)
    base_directory: Optional[str]  # the base's HF directory (base_model.base_dir)
    expert_counts: list  # experts per user (results.json order)

    @property
    def synthetic(self) -> bool:
        return self.cfg.data.source == "synthetic"

    def row(self, user: str) -> int:
        """The user's row in the checkpoint's user axis (0 for a pooled-data method)."""
        return 0 if self.method.pooled_data else self.users.index(user)

    def expert_mask(self, user: str) -> np.ndarray:
        from comigs_jax.federated.users import expert_masks
        counts = self.expert_counts
        masks = expert_masks([max(counts)] if self.method.pooled_data else counts, self.model_cfg.moe.n_experts)
        return np.asarray(masks[self.row(user)])

    def tokenizer_source(self) -> str:
        from comigs_jax.experiment.base_model import base_tokenizer
        return base_tokenizer(self.cfg, self.base_directory)

    def tokenizer(self):
        """The run's tokenizer (None for synthetic data, whose tokens are ids)."""
        if self.synthetic:
            return None
        from comigs_jax.model.hf import load_tokenizer
        return load_tokenizer(self.tokenizer_source())

    def user_params(self, user: str, rows: dict) -> tuple[dict, np.ndarray]:
        """(the user's whole params: base and adapters, host arrays; its expert mask [E] bool)."""
        import jax

        from comigs_jax.federated.roles import merge
        row = self.row(user)
        own = jax.tree.map(lambda a: np.asarray(a[row]), rows)
        return jax.tree.map(np.asarray, merge(self.base, own)), self.expert_mask(user)


def open_run(workdir: str, users: Optional[Iterable[str]] = None) -> FinishedRun:
    """The workdir's finished run, its base loaded. `users` (names) are checked first, with the
    run's existence, so that a bad input is one line before anything slow; None: every user."""
    run_dir = find_run(workdir)
    res = run_results(run_dir)
    names = [u["user"] for u in res["users"]]
    check_users(names, [] if users is None else list(users))
    cfg = run_config(run_dir)

    from comigs_jax import configuration
    from comigs_jax.experiment.base_model import base_dir, load_base, pretrained_base_dir
    from comigs_jax.federated.methods import configure_model, get_method

    if cfg.base == "pretrain" and not os.path.isdir(pretrained_base_dir(cfg)):
        raise RestoreError(f"the run's pretrained base is not in its cache ({pretrained_base_dir(cfg)}); "
                           "rerun python -m experiments.run on this workdir to rebuild it")
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise RestoreError(f"{ckpt_dir} is missing: the run's models cannot be restored")
    method = get_method(res["method"])
    directory = base_dir(cfg, log=lambda m: None)
    vocab = cfg.data.get("synthetic", {}).get("vocab_size", 0)  # used only to pretrain, which the check above rules out
    base_cfg, base = load_base(cfg, vocab, log=lambda m: None, directory=directory)
    model_cfg = configure_model(configuration.model_config(cfg, base_cfg), method.for_mode(cfg.train.faithful))
    model_cfg = dataclasses.replace(model_cfg, remat="none", dtype="float32")
    return FinishedRun(run_dir, cfg, method, names, model_cfg, base_cfg.base, base, directory,
                       list(configuration.expert_counts_of(cfg)))


def restore_rows(run: FinishedRun, model_view: bool = True) -> dict:
    """The trainable params of the run's latest checkpoint (host arrays, every leaf [U, ...] with
    U the checkpoint's user axis), as a nested dict (the checkpoint's flat keys are keystr paths of
    the state: ".params['h_0']['attn']...", or "['states'].params[...]" when the server keeps state
    in the checkpoint, Server.saved).

    model_view (the default): as the trained model sees them. With per-user expert LoRA ranks
    (model.ranks, HetLoRA, FlexLoRA) every row is held at the padded rank and the model applies
    each user's rank scale (comigs_jax.federated.ranks.apply_rank_scale: A times s(r_i) / s(r_max)
    on its current rank's components, B masked), with the current (HetLoRA-pruned) ranks of the
    checkpoint's host state: applied here, so the rows run at the padded rank and its scale give
    each user's trained model. False: the raw checkpoint rows."""
    import ast

    import jax
    import orbax.checkpoint as ocp
    from jax.sharding import SingleDeviceSharding

    ckpt_dir = os.path.join(run.run_dir, "checkpoints")
    mgr = ocp.CheckpointManager(os.path.abspath(ckpt_dir), item_handlers={
        "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
    try:
        step = mgr.latest_step()
        if step is None:
            raise RestoreError(f"{ckpt_dir} holds no checkpoint: the run's models cannot be restored")
        meta = mgr.item_metadata(step)["state"]
        meta = dict(getattr(meta, "tree", meta))
        dev = SingleDeviceSharding(jax.local_devices()[0])
        abstract = {k: jax.ShapeDtypeStruct(tuple(v.shape), v.dtype, sharding=dev) for k, v in meta.items()}
        restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                             meta=ocp.args.JsonRestore()))
        flat, meta = restored.state, restored.meta or {}
    finally:
        mgr.close()
    out: dict = {}
    for key, value in flat.items():
        prefix = next((p for p in (".params[", "['states'].params[") if key.startswith(p)), None)
        if prefix is None:
            continue
        path = [ast.literal_eval(part.rstrip("]")) for part in key[len(prefix):].split("][")]
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = np.asarray(value)
    if model_view:
        scale = rank_scale_rows(run, (meta.get("host") or {}).get("ranks"), _n_rows(out))
        if scale is not None:
            from comigs_jax.federated.ranks import apply_rank_scale
            out = jax.tree.map(np.asarray, apply_rank_scale(out, scale))
    return out


def _n_rows(tree: dict) -> int:
    import jax
    return int(jax.tree.leaves(tree)[0].shape[0])


def rank_scale_rows(run: FinishedRun, current, n_rows: int) -> Optional[np.ndarray]:
    """[n_rows, r_max] the rows' rank scales (the server state's, comigs_jax.federated.server.rank_state):
    the configured ranks (model.ranks; the padded rank for rows beyond the users and for a
    pooled-data method), cut to `current` (the checkpoint's host state "ranks": HetLoRA's pruned
    ranks; None: never cut). None when the run had no per-user ranks (every scale 1)."""
    from comigs_jax import configuration
    from comigs_jax.federated.ranks import rank_scales
    moe = run.model_cfg.moe
    if moe is None:
        return None
    r_max = moe.lora.rank
    configured = configuration.ranks_of(run.cfg) if run.cfg.model.get("ranks", "") else None
    full = np.full(n_rows, r_max, np.int64)
    if configured is not None and not run.method.pooled_data:
        k = min(n_rows, len(configured))
        full[:k] = configured[:k]
    cur = full.copy()
    if current is not None:
        current = np.asarray(current, np.int64)
        k = min(n_rows, len(current))
        cur[:k] = np.minimum(current[:k], full[:k])
    if np.all(full == r_max) and np.all(cur == r_max):
        return None
    return rank_scales(cur, full, moe.lora, r_max)
