"""HetLoRA's server rule in its two modes (method.md §7; docs/reproducing.md, "HetLoRA").

Both modes, within each federation (stacked rows [U, ...], `groups` the federation of each row):

1. Every uploading user compares, per LoRA module, its tail T = |A[:, q:r]|_F |B[q:r, :]|_F
   (r its module's current rank, q = floor(0.99 r)) with the same tail of the server's leaves
   BEFORE this round's aggregation, i.e. of the global module it received at the start of the
   round (`server_tail`, computed when those leaves were made; zero at round 0, where the server's
   B is 0, so nobody is cut there). Below it: the rank is cut to q.
2. The cut tensors (zero beyond the new rank) are averaged zero-padded, each weighted by its
   norm share (rows with weight 0, i.e. no upload, weigh nothing and are never cut).
3. Every row takes the new server leaves truncated to its new rank, and the server's tails at
   the new ranks are kept for the next round.

reference (train.faithful; 77efb25 `HetLoraAggregationStrategy.init`, `_to_pruned_client_data`,
  `to_update`, `to_client_data`): a rank per user per module (each layer's fc and proj of each
  expert decides alone); A weighted by |A_i|_F / sum_j |A_j|_F and B by |B_i|_F / sum_j |B_j|_F
  separately; a rank-1 module may be cut to 0 (int(0.99 * 1) = 0): its adapter is dropped, and an
  empty tail is never below the server's, so it stays 0 (the floor is 0).
clean (the HetLoRA paper, Cho et al. 2024): one rank per user, cut when the sum over its shared
  modules of its tails is below the server's sum; each module's A and B weighted by
  |A_i B_i|_F / sum_j |A_j B_j|_F (the norm of the module's dW, the paper's sparsity weight);
  a rank never goes below 1.

With a server optimizer (servers/optimizer.py) the global of step 2 (`hetlora_global`) is the
aggregate of an optax step of the server's global, and step 3 (`hetlora_distribute`) gives the
rows the stepped global: the tails of later cuts are the stepped global's.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from comigs_jax.federated.ranks import (_group_mean, _lead, _pair, _tail_product, group_has_uploads, leaf_modules,
                                        module_layout, prune_rank, safe_norm, shared_slots)
from comigs_jax.model.precision import wide

FLOOR = {True: 0, False: 1}  # the lowest rank a cut leaves: reference (int(0.99) = 0), clean


def _put(values: jax.Array, offset: int, block: jax.Array) -> jax.Array:
    """values [U, M] with the modules [offset, offset + n) set to block [U, *lead]."""
    return values.at[:, offset:offset + block[0].size].set(block.reshape(block.shape[0], -1))


def _on(ranks: jax.Array, r: int, factor: str, dtype) -> jax.Array:
    """Per-module rank mask broadcasting over a stacked factor: ranks [U, *lead] -> A: [U, *lead,
    1, r], B: [U, *lead, r, 1]."""
    on = (jnp.arange(r) < ranks[..., None]).astype(dtype)
    return on[..., None, :] if factor == "A" else on[..., :, None]


def product_norm(a: jax.Array, b: jax.Array) -> jax.Array:
    """|A B|_F per module [...] for A [..., in, r], B [..., r, out], through the r x r Gram matrices
    (|AB|_F^2 = sum(A^T A * B B^T)), in float32 (float64 for float64 leaves)."""
    f = wide(a.dtype)
    a, b = a.astype(f), b.astype(f)
    ga = jnp.einsum("...ir,...is->...rs", a, a)
    gb = jnp.einsum("...ro,...so->...rs", b, b)
    return jnp.sqrt(jnp.maximum(jnp.sum(ga * gb, axis=(-2, -1)), 0.0))


def _norm_share_mean(x: jax.Array, norm: jax.Array, weights: jax.Array, groups, n_groups) -> jax.Array:
    """Zero-padded mean of x [U, *lead, d1, d2], row i weighted by weights_i norm_i [U, *lead];
    a group whose weighted norms are all 0 (every tensor 0) falls back to weights alone."""
    wn = _lead(weights, norm.ndim).astype(norm.dtype) * norm
    has = jnp.take(jax.ops.segment_sum(wn, groups, n_groups), groups, axis=0) > 0
    w = jnp.where(has, wn, jnp.broadcast_to(_lead(weights, wn.ndim).astype(wn.dtype), wn.shape))
    return _group_mean(x, w[..., None, None], groups, n_groups)


def _layout(flat: dict, is_shared) -> list[tuple]:
    return [(p, lead, off) for p, lead, off in module_layout(flat, rows=True) if is_shared(p)]


def hetlora_cut(flat: dict, weights: jax.Array, ranks: jax.Array, server_tail: jax.Array, *, reference: bool,
                is_shared, n_shared_specialists: int | None) -> jax.Array:
    """Step 1: every uploading user's new ranks [U, M] (flat: stacked leaves [U, ...]; ranks,
    server_tail [U, M] as hetlora_aggregate's)."""
    up = weights > 0
    q = prune_rank(ranks)
    own = jnp.zeros(server_tail.shape, server_tail.dtype)
    shared = np.zeros(ranks.shape[1], bool)  # modules that are uploaded (and so compared)
    for p, lead, off in _layout(flat, is_shared):
        t = _tail_product(flat[p], flat[_pair(p)], leaf_modules(q, lead, off), leaf_modules(ranks, lead, off))
        own = _put(own, off, t.astype(own.dtype))
        shared[off:off + t[0].size] = shared_slots(p, lead, n_shared_specialists).reshape(-1)
    if reference:  # each uploaded module on its own
        cut = (own < server_tail) & jnp.asarray(shared)[None]                      # [U, M]
    else:  # one decision per user, on the sums over its uploaded modules, for all its modules
        below = jnp.where(shared, own, 0).sum(1) < jnp.where(shared, server_tail, 0).sum(1)
        cut = jnp.broadcast_to(below[:, None], own.shape)
    cut = cut & up[:, None] & (q >= FLOOR[reference])
    return jnp.where(cut, q, ranks).astype(ranks.dtype)


def hetlora_global(flat: dict, weights: jax.Array, groups: jax.Array, n_groups: int, new_ranks: jax.Array, *,
                   reference: bool, is_shared) -> dict:
    """Step 2: the federation's global LoRA at the padded rank, {path: [U, ...]} for every shared
    expert factor (each row its federation's copy): the cut uploads averaged zero-padded, each
    weighted by its norm share."""
    out = {}
    for p, lead, off in _layout(flat, is_shared):
        pb = _pair(p)
        rk = leaf_modules(new_ranks, lead, off)
        a = flat[p] * _on(rk, flat[p].shape[-1], "A", flat[p].dtype)          # the cut uploads
        b = flat[pb] * _on(rk, flat[pb].shape[-2], "B", flat[pb].dtype)
        if reference:
            wa, wb = safe_norm(a, (-2, -1)), safe_norm(b, (-2, -1))
        else:
            wa = wb = product_norm(a, b)
        out[p], out[pb] = (_norm_share_mean(a, wa, weights, groups, n_groups),
                           _norm_share_mean(b, wb, weights, groups, n_groups))
    return out


def hetlora_distribute(flat: dict, glob: dict, new_ranks: jax.Array, server_tail: jax.Array, keep_rows: jax.Array,
                       *, is_shared, n_shared_specialists: int | None) -> tuple[dict, jax.Array]:
    """Step 3: rows in keep_rows [U] take the global `glob` (hetlora_global's, or a server
    optimizer's step of it) truncated to their new ranks, and the server's tails at those ranks
    for the next round's comparison; other rows, and the specialist slots that are not averaged,
    keep their leaves and tails. Returns (flat, new server_tail [U, M])."""
    new_tail, out = server_tail, dict(flat)
    for p, lead, off in _layout(flat, is_shared):
        pb, sa, sb = _pair(p), glob[p], glob[_pair(p)]
        rk = leaf_modules(new_ranks, lead, off)
        t = _tail_product(sa, sb, prune_rank(rk), rk).astype(new_tail.dtype)      # next round's comparison
        slot = jnp.asarray(shared_slots(p, lead, n_shared_specialists))[None]      # [1, *lead]
        keep = _lead(keep_rows, rk.ndim) & slot                                    # [U, *lead]
        new_tail = _put(new_tail, off, jnp.where(keep, t, leaf_modules(server_tail, lead, off)))
        out[p] = jnp.where(keep[..., None, None], sa * _on(rk, sa.shape[-1], "A", sa.dtype), flat[p])
        out[pb] = jnp.where(keep[..., None, None], sb * _on(rk, sb.shape[-2], "B", sb.dtype), flat[pb])
    return out, new_tail


def hetlora_aggregate(params: dict, weights: jax.Array, groups: jax.Array, n_groups: int, ranks: jax.Array,
                      server_tail: jax.Array, *, reference: bool, is_shared, n_shared_specialists: int | None):
    """One HetLoRA aggregation of stacked params [U, ...]. weights [U] (0: no upload), ranks
    [U, M] int (per module, module_layout's order; clean: every module of a row at the row's
    rank), server_tail [U, M] the server's tails at those ranks (before this round). Returns
    (params with the shared expert LoRA leaves replaced, new ranks [U, M], new server_tail [U, M]).
    Rows of a federation with no upload keep their leaves, ranks and server tails; expert slots
    that are not averaged (specialists >= n_shared_specialists) keep their leaves and ranks."""
    flat = traverse_util.flatten_dict(params)
    new_ranks = hetlora_cut(flat, weights, ranks, server_tail, reference=reference, is_shared=is_shared,
                            n_shared_specialists=n_shared_specialists)
    glob = hetlora_global(flat, weights, groups, n_groups, new_ranks, reference=reference, is_shared=is_shared)
    has = group_has_uploads(weights, groups, n_groups)
    out, new_tail = hetlora_distribute(flat, glob, new_ranks, server_tail, has, is_shared=is_shared,
                                       n_shared_specialists=n_shared_specialists)
    return traverse_util.unflatten_dict(out), new_ranks, new_tail


def truncate(glob: dict, new_ranks: jax.Array, is_shared) -> dict:
    """The global factors {path: [U, ...]} truncated to each row's ranks [U, M] (zero beyond)."""
    out = dict(glob)
    for p, lead, off in _layout(glob, is_shared):
        rk = leaf_modules(new_ranks, lead, off)
        out[p] = glob[p] * _on(rk, glob[p].shape[-1], "A", glob[p].dtype)
        out[_pair(p)] = glob[_pair(p)] * _on(rk, glob[_pair(p)].shape[-2], "B", glob[_pair(p)].dtype)
    return out
