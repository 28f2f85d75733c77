"""Users with different LoRA ranks in one program, and the rank-aware servers (method.md §7).

Every expert LoRA leaf is held at the padded rank r_max (model.rank): A [..., in, r_max],
B [..., r_max, out]. User i of rank r_i <= r_max carries a rank scale [r_max]:

    rank_scale_i[c] = s(r_i) / s(r_max) for c < rank_i (its current rank), 0 beyond,

with s(r) the model's LoRA scale (alpha / sqrt(r) for rslora). The model sees A * rank_scale and
B * (rank_scale > 0), so its expert correction is s(r_max) (x A') B' = s(r_i) (x A[:, :rank_i]) B[:rank_i]:
exactly a rank-r_i program's. Masked components get no gradient (the product with 0), are zeroed
after every optimiser step (mask_ranks: Adam's momentum would move them) and weigh nothing in the
plain mean (masked_mean). HetLoRA's self-pruning lowers rank_i below r_i (never raises it); the
scale keeps s(r_i), as the reference keeps its full-size tensors and scale.

Only the MLP experts' LoRA leaves are ranked (roles generalist and specialist); the attention
LoRA keeps model.attn_rank for every user, as the reference (method.md §1.2).

Server rules (stacked rows [U, ...], pure and jittable, `groups` [U] the federation of each row):

- masked_mean: the weighted mean of each rank component over the users that have it.
- hetlora, hetlora_reference: comigs_jax.federated.hetlora (a rank per user, or per LoRA module).
- flexlora: per user dW_i = c_i A_i B_i, averaged by training tokens; the server's SVD
  dW = U S V^T; user i takes its leading rank_i components: A_i = U[:, :r_i],
  B_i = S V^T[:r_i] / c'_i. Clean: c_i = c'_i = s(r_i), the model's scale.
- flexlora_reference: as the reference. Its server accumulator is re-created for every user, so
  only the last uploading user's term (n_U / sum_i n_i) dW_U reaches the SVD (D3), and c_i =
  alpha / r_i, c'_i = alpha / r_max (`merge_rate`, `Server._svd`; D3b).
  With a server optimizer (servers/optimizer.py) the SVD is of the stepped server dW instead of
  the mean (`flexlora_mean`, then `flexlora_split`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from comigs_jax.federated.roles import factor_of, role_of, slot_axis
from comigs_jax.model.precision import wide

RANKED_ROLES = ("generalist", "specialist")


def is_ranked(path: tuple) -> bool:
    """Whether the leaf at `path` is an expert LoRA factor (held at the padded rank)."""
    return role_of(path) in RANKED_ROLES and factor_of(path) is not None


def prune_rank(r):
    """q = floor(0.99 r): the rank a HetLoRA cut leaves, and where the pruning tail starts. In
    integers, (99 r) // 100 (exact; Python ints, NumPy or JAX integer arrays). prune_rank(1) = 0:
    the reference (`int(0.99 * 1)`) then drops the module's adapter; whether a cut may go there is
    the server's floor (comigs_jax.federated.hetlora)."""
    return (99 * r) // 100


def lora_scale(lora, r) -> float:
    """The model's LoRA scale at rank r for a LoRAConfig's alpha and scaling."""
    return lora.alpha / (r ** 0.5 if lora.scaling == "rslora" else r)


def rank_scales(ranks, full_ranks, lora, r_max: int) -> np.ndarray:
    """[U, r_max] float64 (float32 on a device without 64-bit JAX): s(full_i) / s(r_max) on the
    components < ranks[i], 0 beyond."""
    ranks, full = np.asarray(ranks), np.asarray(full_ranks)
    ratio = np.array([lora_scale(lora, int(r)) / lora_scale(lora, r_max) for r in full], np.float64)
    on = np.arange(r_max)[None, :] < ranks[:, None]
    return on * ratio[:, None]


def _pair(path: tuple) -> tuple:
    """The path of the other factor of a LoRA leaf (fc_A <-> fc_B)."""
    last = path[-1]
    return path[:-1] + (last[:-1] + ("B" if last[-1] == "A" else "A"),)


def _rank_vec(scale: jax.Array, factor: str, ndim: int) -> jax.Array:
    """A per-component vector [..., r] reshaped to broadcast over a factor of `ndim` dims whose
    leading axes match scale's leading axes (none for one user, [U] for stacked rows)."""
    lead = scale.ndim - 1
    shape = list(scale.shape[:lead]) + [1] * (ndim - lead)
    shape[-1 if factor == "A" else -2] = scale.shape[-1]
    return scale.reshape(shape)


def module_layout(flat: dict, rows: bool) -> list[tuple]:
    """The LoRA modules of a flat tree of expert leaves (arrays or shapes), in a fixed order: one
    entry (A path, lead shape, offset) per ranked A leaf, sorted by path; its modules are the
    elements of the lead shape (layers x expert slots: each layer's fc or proj of one expert, as
    the reference's named tensors) at offsets [offset, offset + prod(lead)) of a module axis.
    rows: the leaves lead with a row axis [U, ...]."""
    out, off = [], 0
    for p in sorted(q for q in flat if is_ranked(q) and factor_of(q) == "A"):
        lead = tuple(flat[p].shape)[int(rows):-2]
        out.append((p, lead, off))
        off += int(np.prod(lead, dtype=np.int64))
    return out


def n_modules(flat: dict, rows: bool = False) -> int:
    """M: the number of LoRA modules of a flat tree (module_layout)."""
    return sum(int(np.prod(lead, dtype=np.int64)) for _, lead, _ in module_layout(flat, rows))


def leaf_modules(values: jax.Array, lead: tuple, offset: int) -> jax.Array:
    """values [..., M] (per module) -> [..., *lead]: one ranked leaf's modules."""
    n = int(np.prod(lead, dtype=np.int64))
    return values[..., offset:offset + n].reshape(values.shape[:-1] + lead)


def _module_rank_masks(flat: dict, modules: jax.Array, dtype_of) -> dict:
    """{path: mask} broadcasting over each ranked leaf: component c of a module kept when c < the
    module's rank. modules [M] (one user) or [U, M] (stacked rows, then the leaves lead with U)."""
    rows = modules.ndim == 2
    out = {}
    for p, lead, off in module_layout(flat, rows):
        r = flat[p].shape[-1]
        on = jnp.arange(r) < leaf_modules(modules, lead, off)[..., None]          # [(U,) *lead, r]
        out[p] = on[..., None, :].astype(dtype_of(p))
        out[_pair(p)] = on[..., :, None].astype(dtype_of(_pair(p)))
    return out


def apply_rank_scale(params: dict, scale: jax.Array, modules: jax.Array | None = None) -> dict:
    """The model's view of one user's (scale [r]) or stacked users' (scale [U, r]) params: each
    expert A times the rank scale, each expert B masked to the rank; with per-module ranks
    (modules [M] or [U, M], HetLoRA as the reference) also each module masked to its own rank."""
    flat = traverse_util.flatten_dict(params)
    per = {} if modules is None else _module_rank_masks(flat, modules, lambda p: flat[p].dtype)
    out = {}
    for p, x in flat.items():
        if is_ranked(p):
            f = factor_of(p)
            v = scale if f == "A" else (scale > 0).astype(x.dtype)
            x = x * _rank_vec(v, f, x.ndim).astype(x.dtype)
            if p in per:
                x = x * per[p]
        out[p] = x
    return traverse_util.unflatten_dict(out)


def mask_ranks(params: dict, scale: jax.Array, modules: jax.Array | None = None) -> dict:
    """Expert LoRA components beyond each user's rank set to 0 (scale [r] or [U, r]), and beyond
    each module's rank when per-module ranks are given (modules [M] or [U, M])."""
    flat = traverse_util.flatten_dict(params)
    per = {} if modules is None else _module_rank_masks(flat, modules, lambda p: flat[p].dtype)
    out = {}
    for p, x in flat.items():
        if is_ranked(p):
            x = x * _rank_vec((scale > 0).astype(x.dtype), factor_of(p), x.ndim)
            if p in per:
                x = x * per[p]
        out[p] = x
    return traverse_util.unflatten_dict(out)


def safe_norm(x: jax.Array, axes) -> jax.Array:
    """Frobenius norm over `axes` whose gradient is 0 (not NaN) at 0 (method.md §7)."""
    sq = jnp.sum(jnp.square(x.astype(wide(x.dtype))), axis=axes)
    return jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)


def _tail_product(a: jax.Array, b: jax.Array, lo, hi) -> jax.Array:
    """|A[..., :, lo:hi]|_F |B[..., lo:hi, :]|_F per module [...]; lo, hi scalars or [U] (then a, b
    lead with [U])."""
    r = a.shape[-1]
    lo, hi = jnp.asarray(lo), jnp.asarray(hi)
    tail = (jnp.arange(r) >= lo[..., None]) & (jnp.arange(r) < hi[..., None])   # [..., r]
    t = tail.astype(a.dtype)
    return safe_norm(a * _rank_vec(t, "A", a.ndim), (-2, -1)) * safe_norm(b * _rank_vec(t, "B", b.ndim), (-2, -1))


def pruning_penalty(params: dict, q, r_full, expert_mask: jax.Array | None = None) -> jax.Array:
    """One user's P = sum over layers, experts and matmuls of |A[:, q:r]|_F |B[q:r, :]|_F with
    q = floor(0.99 r_full) (method.md §7); absent experts (expert_mask [E] False) count 0."""
    flat = traverse_util.flatten_dict(params)
    total = jnp.zeros(())  # float32 (float64 under 64-bit JAX, for float64 leaves)
    for p, a in flat.items():
        if not (is_ranked(p) and factor_of(p) == "A"):
            continue
        t = _tail_product(a, flat[_pair(p)], q, r_full)                          # [(L,) slots]
        if expert_mask is not None:
            n = t.shape[-1]  # generalists: the first slots of the mask; specialists: the last
            m = expert_mask[:n] if role_of(p) == "generalist" else expert_mask[expert_mask.shape[0] - n:]
            t = t * m.astype(t.dtype)
        total = total + t.sum()
    return total


# ----------------------------------------------------------------------------- server rules
def _group_mean(x: jax.Array, w: jax.Array, groups: jax.Array, n_groups: int) -> jax.Array:
    """Per row, its group's sum_i w_i x_i / sum_i w_i over rows, [U, ...]; w broadcasts to x.
    A group (and component) with no weight gets 0."""
    f32 = wide(x.dtype)  # float32 accumulation (float64 for float64 leaves)
    w = jnp.broadcast_to(w.astype(f32), jnp.broadcast_shapes(w.shape, x.shape))
    num = jax.ops.segment_sum(w * x.astype(f32), groups, n_groups)
    den = jax.ops.segment_sum(w, groups, n_groups)
    return jnp.take(num / jnp.where(den > 0, den, 1.0), groups, axis=0).astype(x.dtype)


def _lead(v: jax.Array, ndim: int) -> jax.Array:
    """[U] -> [U, 1, ..., 1] with ndim dims."""
    return v.reshape(v.shape + (1,) * (ndim - 1))


def masked_mean(x: jax.Array, factor: str, weights: jax.Array, scale: jax.Array, groups, n_groups) -> jax.Array:
    """Each rank component averaged over the users that have it (weights [U] times their mask),
    returned masked to each row's rank. x [U, ..., in, r] (A) or [U, ..., r, out] (B)."""
    m = _rank_vec((scale > 0).astype(jnp.float32), factor, x.ndim)
    return _group_mean(x, _lead(weights, x.ndim) * m, groups, n_groups) * m.astype(x.dtype)


def last_in_group(weights: jax.Array, groups: jax.Array, n_groups: int) -> jax.Array:
    """[U] bool: the row of its group with the largest index among those with weight > 0."""
    idx = jnp.arange(weights.shape[0])
    last = jax.ops.segment_max(jnp.where(weights > 0, idx, -1), groups, n_groups)
    return idx == jnp.take(last, groups)


def flexlora_mean(a: jax.Array, b: jax.Array, weights: jax.Array, form: jax.Array, groups, n_groups,
                  last_only: bool = False) -> jax.Array:
    """FlexLoRA's aggregate of one leaf pair: a [U, ..., in, r], b [U, ..., r, out] (masked to
    each rank), weights [U] (training tokens; 0 for users that sit out), form [U] the scales c_i ->
    [G, ..., in, out] the weighted mean of dW_i = c_i A_i B_i per group (float32; float64 for
    float64 leaves). last_only (the reference, D3): (n_U / sum_i n_i) dW_U, U the group's last
    row with weight, instead of the weighted mean of every dW_i."""
    f32 = wide(a.dtype)  # float32 accumulation (float64 for float64 leaves)
    dw = jnp.einsum("u...ir,u...ro->u...io", a.astype(f32), b.astype(f32)) * _lead(form, a.ndim)
    w = weights.astype(f32)
    wsum = jax.ops.segment_sum(w, groups, n_groups)
    if last_only:
        w = jnp.where(last_in_group(w, groups, n_groups), w, 0.0)
    mean = jax.ops.segment_sum(_lead(w, dw.ndim) * dw, groups, n_groups)
    return mean / _lead(jnp.where(wsum > 0, wsum, 1.0), dw.ndim)


def flexlora_split(dw: jax.Array, ranks: jax.Array, back: jax.Array, groups, r: int, dtypes) -> tuple:
    """Each row's factors of its group's dW [G, ..., in, out]: the SVD dW = U S V^T, A_i =
    U[:, :r_i], B_i = S V^T[:r_i] / c'_i, zero beyond r_i (ranks, back [U]; r the padded rank;
    dtypes those of A and B)."""
    u, s, vt = jnp.linalg.svd(dw, full_matrices=False)
    u, bs = u[..., :, :r], s[..., :r, None] * vt[..., :r, :]
    m = (jnp.arange(r)[None, :] < ranks[:, None]).astype(dw.dtype)               # [U, r]
    new_a = jnp.take(u, groups, axis=0) * _rank_vec(m, "A", u.ndim)
    new_b = jnp.take(bs, groups, axis=0) * _rank_vec(m, "B", bs.ndim) / _lead(back, bs.ndim)
    return new_a.astype(dtypes[0]), new_b.astype(dtypes[1])


def flexlora_factors(a: jax.Array, b: jax.Array, weights: jax.Array, ranks: jax.Array, form: jax.Array,
                     back: jax.Array, groups, n_groups, last_only: bool = False) -> tuple[jax.Array, jax.Array]:
    """FlexLoRA for one leaf pair (flexlora_mean, then flexlora_split): a [U, ..., in, r], b [U,
    ..., r, out] -> (A, B) [U, ...]: each row's leading r_i components of its group's SVD."""
    mean = flexlora_mean(a, b, weights, form, groups, n_groups, last_only)      # [G, ..., in, out]
    return flexlora_split(mean, ranks, back, groups, a.shape[-1], (a.dtype, b.dtype))


def aggregate_ranked(params: dict, weights: jax.Array, n_tokens: jax.Array, ranks: jax.Array,
                     scale: jax.Array, form: jax.Array, back: jax.Array, *, rule: str, is_shared,
                     n_shared_specialists: int | None, groups: jax.Array, n_groups: int) -> tuple[dict, jax.Array]:
    """The ranked (expert LoRA) shared leaves of stacked params [U, ...] by `rule` ("mean":
    masked_mean, "flexlora", "flexlora_reference"; HetLoRA: comigs_jax.federated.hetlora); other
    leaves returned as given (the caller averages them with comigs_jax.federated.aggregate). weights [U]: participation (x tokens) weights;
    n_tokens [U]: FlexLoRA's weights; ranks [U] current ranks; scale [U, r] rank scales;
    form / back [U]: FlexLoRA's scales. Rows of a group with no weight (nobody uploaded) keep their
    leaves, as comigs_jax.federated.aggregate's. Returns (params, new ranks [U])."""
    flat = traverse_util.flatten_dict(params)
    ranked = {p: x for p, x in flat.items() if is_ranked(p) and is_shared(p)}
    new = {}
    new_ranks = ranks
    if rule == "mean":
        new = {p: masked_mean(x, factor_of(p), weights, scale, groups, n_groups) for p, x in ranked.items()}
    elif rule in ("flexlora", "flexlora_reference"):
        for p, a in ranked.items():
            if factor_of(p) == "A":
                new[p], new[_pair(p)] = flexlora_factors(a, ranked[_pair(p)], n_tokens, ranks, form, back,
                                                         groups, n_groups, last_only=rule == "flexlora_reference")
    else:
        raise ValueError(f"rank rule {rule!r}: allowed mean, flexlora, flexlora_reference")
    return traverse_util.unflatten_dict(keep_unshared(new, flat, weights, groups, n_groups,
                                                      n_shared_specialists)), new_ranks


def group_has_uploads(weights: jax.Array, groups: jax.Array, n_groups: int) -> jax.Array:
    """[U] bool: whether the row's group (federation) has a row with weight > 0."""
    return jnp.take(jax.ops.segment_sum(weights.astype(jnp.float32), groups, n_groups) > 0, groups)


def shared_slots(path: tuple, lead: tuple, n_shared_specialists: int | None) -> np.ndarray:
    """[*lead] bool (a leaf's modules, without the row axis): whether each module's expert slot is
    averaged (specialist slots >= n_shared_specialists are not)."""
    on = np.ones(lead, bool)
    axis = slot_axis(path)
    if role_of(path) == "specialist" and n_shared_specialists is not None and n_shared_specialists < lead[axis]:
        shape = [1] * len(lead)
        shape[axis] = -1
        on = on & (np.arange(lead[axis]) < n_shared_specialists).reshape(shape)
    return on


def keep_unshared(new: dict, flat: dict, weights, groups, n_groups: int, n_shared_specialists) -> dict:
    """flat (stacked [U, ...]) with the leaves in `new` replaced, except in the rows of a group with
    no upload and in the specialist slots that are not averaged (those keep their old values)."""
    out = dict(flat)
    has = group_has_uploads(weights, groups, n_groups)
    for p, x in new.items():
        old = flat[p]
        x = jnp.where(_lead(has, x.ndim), x, old)
        axis = 1 + slot_axis(p)
        if role_of(p) == "specialist" and n_shared_specialists is not None and n_shared_specialists < old.shape[axis]:
            shape = [1] * old.ndim
            shape[axis] = -1
            x = jnp.where((jnp.arange(old.shape[axis]) < n_shared_specialists).reshape(shape), x, old)
        out[p] = x
    return out
