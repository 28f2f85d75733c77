"""The tied LM head's cross-entropy without a [B, T, V] logits array.

GPT-2's head is the token embedding E [V, d] (tied to `wte`, frozen in CoMiGS). The full logits of
a batch are N x V float32 (8 x 128 tokens x 50,257 = 206 MB, and the backward keeps exp(logits)
and builds d logits of the same size); here they exist one vocabulary block [N, block] at a time,
in a scan with an online logsumexp.

The gradient with respect to x, softmax(x E^T) E - E[label], is accumulated in the same scan
(online, like flash attention's output): the backward only scales it, so a training step runs the
head's two matmuls as the full-logits path does (logits, and d logits @ E) and keeps [N, d]
instead of [N, V]. The embedding's gradient, needed only if it is trained, is a second blocked
pass in the backward (custom_vjp with symbolic zeros tells which inputs are differentiated).

Numerics follow GPT2's logits path: logits = x @ E^T in the activation dtype, then float32.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax


def full_logits(x: jax.Array, embedding: jax.Array) -> jax.Array:
    """x [..., d] (activation dtype), embedding [V, d] -> logits [..., V] float32 (as nn.Embed.attend)."""
    return jnp.dot(x, embedding.astype(x.dtype).T).astype(jnp.float32)


def _block_logits(x, emb, labels, i, block):
    """Block i's logits [N, block] float32 with the columns of earlier blocks at -inf, whether each
    column is the token's label [N, block], and the block's embedding rows [block, d].

    The last block ends at V and overlaps the previous one (no padded vocabulary)."""
    vocab = emb.shape[0]
    start = jnp.minimum(i * block, vocab - block)
    e_blk = jax.lax.dynamic_slice_in_dim(emb, start, block, 0)            # [block, d]
    col = start + jnp.arange(block)
    valid = col >= i * block                                              # not counted by an earlier block
    z = jnp.where(valid, full_logits(x, e_blk), -jnp.inf)                 # [N, block]
    return z, valid & (col == labels[:, None]), e_blk, start


def _scan(x, emb, labels, block, with_grad):
    """One pass over the vocabulary. Returns lse [N], label logit [N] and, with_grad,
    softmax(logits) @ E [N, d] float32."""
    n, d = x.shape
    n_blocks = -(-emb.shape[0] // block)

    def step(carry, i):
        m, s, label_logit, acc = carry
        z, hit, e_blk, _ = _block_logits(x, emb, labels, i, block)
        m_new = jnp.maximum(m, z.max(-1))                                 # running max (the first block is finite)
        rescale = jnp.exp(m - m_new)
        p = jnp.exp(z - m_new[:, None])                                   # [N, block], 0 on masked columns
        s = s * rescale + p.sum(-1)
        label_logit = label_logit + jnp.where(hit, z, 0.0).sum(-1)
        if with_grad:
            acc = acc * rescale[:, None] + jnp.dot(p.astype(x.dtype), e_blk, preferred_element_type=jnp.float32)
        return (m_new, s, label_logit, acc), None

    f32 = jnp.float32
    init = (jnp.full((n,), -jnp.inf, f32), jnp.zeros((n,), f32), jnp.zeros((n,), f32),
            jnp.zeros((n, d), f32) if with_grad else None)
    (m, s, label_logit, acc), _ = jax.lax.scan(step, init, jnp.arange(n_blocks))
    lse = m + jnp.log(s)
    return lse, label_logit, None if acc is None else acc / s[:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked_ce(x, embedding, labels, block):
    lse, label_logit, _ = _scan(x, embedding.astype(x.dtype), labels, block, with_grad=False)
    return lse - label_logit


def _blocked_ce_fwd(x, embedding, labels, block):
    xv, emb = x.value, embedding.value.astype(x.value.dtype)
    lab = labels.value
    lse, label_logit, soft_e = _scan(xv, emb, lab, block, with_grad=x.perturbed)
    # d ce / d x = softmax @ E - E[label], kept in the activation dtype: [N, d] instead of [N, V].
    dce_dx = None if soft_e is None else (soft_e - emb[lab].astype(jnp.float32)).astype(xv.dtype)
    res = (dce_dx, (xv, lse, embedding.value) if embedding.perturbed else None, lab)
    return lse - label_logit, res


def _blocked_ce_bwd(block, res, g):
    dce_dx, for_emb, labels = res
    g = g.astype(jnp.float32)                                              # [N]
    dx = None if dce_dx is None else (g[:, None] * dce_dx).astype(dce_dx.dtype)
    d_emb = None
    if for_emb is not None:  # only if the head is trained: recompute each block's softmax
        x, lse, embedding = for_emb
        emb = embedding.astype(x.dtype)

        def step(acc, i):
            z, hit, _, start = _block_logits(x, emb, labels, i, block)
            dz = (jnp.exp(z - lse[:, None]) - hit) * g[:, None]              # [N, block], 0 on masked columns
            d_blk = jnp.dot(dz.astype(x.dtype).T, x, preferred_element_type=jnp.float32)  # [block, d]
            cur = jax.lax.dynamic_slice_in_dim(acc, start, block, 0)
            return jax.lax.dynamic_update_slice_in_dim(acc, cur + d_blk, start, 0), None

        n_blocks = -(-emb.shape[0] // block)
        d_emb, _ = jax.lax.scan(step, jnp.zeros(emb.shape, jnp.float32), jnp.arange(n_blocks))
        d_emb = d_emb.astype(embedding.dtype)
    return dx, d_emb, None


_blocked_ce.defvjp(_blocked_ce_fwd, _blocked_ce_bwd, symbolic_zeros=True)


def head_cross_entropy(x: jax.Array, embedding: jax.Array, labels: jax.Array, block: int) -> jax.Array:
    """Per-token cross-entropy of the tied head: x [N, d], embedding [V, d], labels [N] int -> [N] float32.

    Equals optax.softmax_cross_entropy_with_integer_labels(full_logits(x, embedding), labels),
    values and gradients. block: vocabulary columns per scan step; 0 = the full [N, V] logits at
    once (today's path); block >= V is one step.
    """
    if block == 0:
        return optax.softmax_cross_entropy_with_integer_labels(full_logits(x, embedding), labels)
    return _blocked_ce(x, embedding, labels.astype(jnp.int32), min(block, embedding.shape[0]))


def token_cross_entropy(hidden: jax.Array, embedding: jax.Array, labels: jax.Array, block: int) -> jax.Array:
    """hidden [B, T, d] (GPT2's final hidden state), labels [B, T] -> cross-entropy [B, T] float32."""
    lead = hidden.shape[:-1]
    ce = head_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), embedding, labels.reshape(-1), block)
    return ce.reshape(lead)
