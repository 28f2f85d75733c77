"""Users from categories: how many tokens of which category each user's splits hold.

A partition is computed for all U users from the config alone (no I/O), so user i's share of
every (category, split) document pool is known before any document is read, and does not
depend on which users a process builds.

Kinds (C = number of categories, c_i = categories[i mod C]):

* ``specific``: user i holds only c_i (the paper's one-category-per-user setting). With U > C,
  several users share a category and get disjoint documents of it.
* ``mixed``: users come in pairs over two categories. With a = c_{2p}, b = c_{2p+1} and share s
  (default 1/4, the reference's AG News construction): user 2p holds s of a and 1-s of b, user
  2p+1 holds 1-s of a and s of b, in every split.
* ``dirichlet``: user i's mixture over the C categories is drawn from Dirichlet(alpha), seeded by
  (seed, i); the same mixture in every split.
* ``ood``: user i's target is c_i; its validation and test splits are pure c_i, its training
  split is c_{i + ood_shift} with a share ``ood_target_share`` (default 0) of c_i. The router,
  trained on validation data, sees the target, while the experts train on another distribution
  (the bi-level motivation of the paper). The paper does not specify its OOD construction; this
  is our choice.

Token counts per category are integers that add up exactly to the split size (largest remainder).
Within one (category, split) pool, users take documents in user order (user 0 first).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from comigs_jax.data.config import SPLITS


@dataclass
class UserSpec:
    name: str
    # split -> list of (category, n_tokens), n_tokens > 0, in category order
    parts: dict = field(default_factory=dict)


def _alloc(total: int, weights: np.ndarray) -> np.ndarray:
    """Integers >= 0 summing to total, proportional to weights (largest remainder)."""
    w = np.asarray(weights, np.float64)
    w = w / w.sum()
    raw = w * total
    base = np.floor(raw).astype(np.int64)
    rest = total - int(base.sum())
    order = np.argsort(-(raw - base), kind="stable")
    base[order[:rest]] += 1
    return base


def _parts(cats, weights, n):
    counts = _alloc(n, weights)
    return [(c, int(k)) for c, k in zip(cats, counts) if k > 0]


def _fmt(cats, w):
    return "+".join(f"{c}:{x:.2f}" for c, x in zip(cats, w) if x > 0)


def make_partition(data_cfg, categories: list[str]) -> list[UserSpec]:
    kind, U, C = data_cfg.partition, int(data_cfg.n_users), len(categories)
    sizes = {s: int(data_cfg[f"{s}_tokens"]) for s in SPLITS}
    users = []
    for i in range(U):
        if kind == "specific":
            c = categories[i % C]
            rep = i // C
            name = c if U <= C else f"{c}#{rep}"
            users.append(UserSpec(name, {s: [(c, n)] for s, n in sizes.items()}))
        elif kind == "mixed":
            p = i // 2
            a, b = categories[(2 * p) % C], categories[(2 * p + 1) % C]
            if a == b:
                b = categories[(2 * p + 2) % C]
            sh = float(data_cfg.mixed_share)
            w = [sh, 1 - sh] if i % 2 == 0 else [1 - sh, sh]
            users.append(UserSpec(_fmt([a, b], w), {s: _parts([a, b], w, n) for s, n in sizes.items()}))
        elif kind == "dirichlet":
            rng = np.random.default_rng([int(data_cfg.seed), 5003, i])
            w = rng.dirichlet(np.full(C, float(data_cfg.dirichlet_alpha)))
            users.append(UserSpec(f"dir{i}({_fmt(categories, w)})",
                                  {s: _parts(categories, w, n) for s, n in sizes.items()}))
        elif kind == "ood":
            tgt = categories[i % C]
            src = categories[(i + int(data_cfg.ood_shift)) % C]
            ts = float(data_cfg.ood_target_share)
            if src == tgt:
                train = [(tgt, sizes["train"])]
            else:
                train = _parts([src, tgt], [1 - ts, ts], sizes["train"])
            users.append(UserSpec(f"{tgt}<-{_fmt([src, tgt], [1 - ts, ts]) if src != tgt else tgt}",
                                  {"train": train, "valid": [(tgt, sizes["valid"])], "test": [(tgt, sizes["test"])]}))
        else:
            raise ValueError(f"data.partition={kind!r} is not allowed: one of specific, mixed, dirichlet, ood")
    return users


def pool_demands(users: list[UserSpec]) -> dict:
    """(category, split) -> [(user index, n_tokens)] in user order."""
    out: dict = {}
    for i, u in enumerate(users):
        for s, parts in u.parts.items():
            for c, n in parts:
                out.setdefault((c, s), []).append((i, n))
    return out
