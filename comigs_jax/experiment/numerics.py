"""NaN / inf checks of a round, before its state is aggregated or checkpointed."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from comigs_jax.errors import NumericalFault


def first_nonfinite(m: dict, active) -> tuple | None:
    """(step, user, metric, value) of the earliest non-finite per-step metric ([users, steps, ...])
    of the users in `active`, or None."""
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


@jax.jit
def _finite_per_user(leaves):
    return jnp.stack([jnp.isfinite(x.reshape(x.shape[0], -1)).all(1) for x in leaves]).all(0)


def nonfinite_users(states) -> list[int]:
    """Users (leading axis) any of whose floating-point state is NaN or inf (every process)."""
    leaves = [x for x in jax.tree_util.tree_leaves(states)
              if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim >= 1]
    if not leaves:
        return []
    ok = _finite_per_user(leaves)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        ok = multihost_utils.process_allgather(ok, tiled=True)
    return [int(u) for u in np.flatnonzero(~np.asarray(ok))]


def fault(what: str, round_index: int, users: list[str], user: int | None, step: int | None, local_steps: int,
          lr: float, latest: int | None, ckpt_dir: str) -> NumericalFault:
    """The one-line error: what, where (round, user, step), what was kept, what to try."""
    where = f"round {round_index}" + (f", user {user} ({users[user]})" if user is not None else "") + \
        (f", step {step} of {local_steps}" if step is not None else "")
    kept = f"the latest checkpoint is round {latest} in {ckpt_dir}" if latest else "no checkpoint was written yet"
    return NumericalFault(f"{what} at {where}; stopped before aggregation, no checkpoint of this state was "
                          f"written ({kept}); lower train.lr (now {lr:g}) or check the data")
