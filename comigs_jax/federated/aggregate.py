"""Aggregation: a masked, weighted mean over the user axis of the shared leaves (method.md §4).

Pure and jittable. Across devices the sum over the sharded users axis is an all-reduce that XLA
derives from the shardings; nothing here knows about devices.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import traverse_util

from comigs_jax.federated.roles import factor_of, role_of, slot_axis
from comigs_jax.model.precision import wide


def _mean_over_users(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [U, ...], w [U] (sums to 1) -> the weighted mean broadcast back to [U, ...]."""
    f32 = wide(x.dtype)  # float32 accumulation (float64 for float64 leaves)
    mean = jnp.einsum("u,u...->...", w.astype(f32), x.astype(f32)).astype(x.dtype)
    return jnp.broadcast_to(mean, x.shape)


def _mean_within_groups(x: jax.Array, w: jax.Array, groups: jax.Array) -> jax.Array:
    """x [U, ...], w [G, U] (each row sums to 1 over its group's users, 0 elsewhere), groups [U]
    -> each user's own group's weighted mean [U, ...] (a gather of the [G, ...] means)."""
    means = jnp.einsum("gu,u...->g...", w, x.astype(wide(x.dtype))).astype(x.dtype)
    return jnp.take(means, groups, axis=0)


def aggregate(params: dict, weights: jax.Array, shared_roles: tuple[str, ...],
              n_shared_specialists: int | None = None, shared_factors: tuple[str, ...] = ("A", "B"),
              frozen: tuple[str, ...] = (), groups: jax.Array | None = None, n_groups: int = 1) -> dict:
    """Replace every shared leaf of every user by the weighted mean over users.

    params: trainable leaves with a leading user axis [U, ...].
    weights [U]: non-negative; 0 for padding users and users that sat out the round. They are
      normalised here; the mean is broadcast to all users, those with weight 0 included. With no
      weight at all (in a group: within that group) there is nothing to average: the rows keep
      their own leaves (a mean over no one would be 0 / 0).
    shared_roles: roles to average (attn, generalist, specialist, router); other leaves are
      returned unchanged.
    n_shared_specialists: with heterogeneous expert counts only the specialist slots that every
      user has are shared (the first min(E_i) - n_generalists); None shares them all.
    shared_factors: the LoRA factors of the shared roles that are averaged (routers have none).
    frozen: "role.factor" leaves that never change (FFA-LoRA's A): returned as they are.
    groups [U] int (with n_groups, static): the federation of each row when several federations
      share the user axis; weights are normalised within each group and every row gets its own
      group's mean. None, or one group: one federation, the plain mean above (the same program
      as a federation alone, so a run's sums do not depend on how it is stacked).
    """
    if groups is None or n_groups == 1:
        total = jnp.sum(weights)
        w = weights / jnp.where(total > 0, total, 1)
        mean_of = lambda x: jnp.where(total > 0, _mean_over_users(x, w), x)
    else:
        # float32 weights (float64 ones kept, as the one-group path keeps them)
        wg = (groups[None, :] == jnp.arange(n_groups)[:, None]) * weights.astype(wide(weights.dtype))[None, :]
        total = jnp.sum(wg, axis=1, keepdims=True)
        wg = wg / jnp.where(total > 0, total, 1)
        has = jnp.take(total[:, 0] > 0, groups)  # [U]: the row's group has weight
        mean_of = lambda x: jnp.where(has.reshape((-1,) + (1,) * (x.ndim - 1)), _mean_within_groups(x, wg, groups),
                                      x)
    flat = traverse_util.flatten_dict(params)
    out = {}
    for path, x in flat.items():
        role, factor = role_of(path), factor_of(path)
        if role not in shared_roles or (factor is not None and factor not in shared_factors) \
                or f"{role}.{factor}" in frozen:
            out[path] = x
            continue
        mean = mean_of(x)
        axis = 1 + slot_axis(path)  # after the user axis (and a scanned layer axis)
        if role == "specialist" and n_shared_specialists is not None and n_shared_specialists < x.shape[axis]:
            shape = [1] * x.ndim
            shape[axis] = -1
            slot = (jnp.arange(x.shape[axis]) < n_shared_specialists).reshape(shape)
            mean = jnp.where(slot, mean, x)
        out[path] = mean
    return traverse_util.unflatten_dict(out)


def aggregation_weights(real: jax.Array, active: jax.Array, n_tokens: jax.Array | None = None) -> jax.Array:
    """[U] weights: uniform over real, participating users (the reference), or by token count."""
    w = (real & active).astype(jnp.float32)
    return w if n_tokens is None else w * n_tokens.astype(jnp.float32)
