"""A run's identity: the config values that must match for a workdir's run to be resumed."""
from __future__ import annotations

import json
import os

from comigs_jax.errors import WorkdirError

# Keys that may change between a run and its resumption without making it another run.
# model.remat and model.head_block change what is recomputed and how the loss is blocked, not the math
# or the saved state; train.user_chunk changes the saved state's padding, so it is not among them.
RESUMABLE_KEYS = ("resume", "output", "checkpoint", "methods", "seeds", "federation.mode", "federation.shard",
                  "federation.stack_seeds",
                  "distributed", "data.cache_dir", "data.use_cache", "data.progress", "model.remat", "eval.zero_shot",
                  "model.head_block")

# Keys added after runs were already written, with the value those runs implicitly had: a stored
# identity without such a key matches a config that keeps that value (older workdirs still resume).
ADDED_KEYS = {"data.train_shares": "", "model.ranks": "", "train.prune_lambda": 0.0, "federation.dropout": 0.0,
              "data.synthetic.base_knows_shared": 1.0, "data.synthetic.target_share_shift": 0.0,
              "model.router_kind": "learned", "train.prox_mu": 0.0, "server.optimizer": "none", "server.lr": 1.0,
              "server.momentum": 0.0, "server.b1": 0.9, "server.b2": 0.99, "server.tau": 1e-3,
              "federation.sit_out": "skip", "federation.sampling": "fixed", "dp.enabled": False, "dp.clip": 1.0,
              "dp.noise_multiplier": 1.0, "dp.delta": 1e-5, "dp.target_epsilon": 0.0, "pretrain.text": ""}


def first_difference(old: dict, new: dict) -> str | None:
    """'key: old there, new now[, and N more]' of the first key (sorted) whose values differ, or
    None when the dicts agree: what a refusal to reuse a folder or checkpoint quotes."""
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if not diff:
        return None
    k = diff[0]
    more = f", and {len(diff) - 1} more" if len(diff) > 1 else ""
    return f"{k}: {old.get(k)!r} there, {new.get(k)!r} now{more}"


def flat_config(cfg) -> dict:
    """{"a.b.c": value} of a ConfigDict."""
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
    flat = {k: v for k, v in flat_config(cfg).items()
            if not any(k == r or k.startswith(r + ".") for r in RESUMABLE_KEYS)}
    flat["method"], flat["seed"] = method, seed
    return flat


def check_workdir(run_dir: str, identity: dict, resume: bool) -> bool:
    """True to resume. WorkdirError (one line) for a workdir that holds another config's run."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        return False
    try:
        with open(path) as f:
            old = json.load(f)["identity"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WorkdirError(f"{path} cannot be read ({type(e).__name__}), so this workdir's run is unknown; "
                           "use another --workdir") from None
    old = {**{k: v for k, v in ADDED_KEYS.items() if k in identity}, **old}
    diff = first_difference(old, identity)
    if diff:
        raise WorkdirError(f"{run_dir} holds a run of another config ({diff}); use another --workdir")
    return resume


def write_config_json(run_dir: str, identity: dict, cfg) -> None:
    """config.json: the run's identity and resolved config, written atomically."""
    tmp = os.path.join(run_dir, "config.json.tmp")
    with open(tmp, "w") as f:  # a kill never leaves a half-written config.json
        json.dump({"identity": identity, "config": json.loads(cfg.to_json_best_effort())}, f, indent=1)
    os.replace(tmp, os.path.join(run_dir, "config.json"))
