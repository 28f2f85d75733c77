"""The tied LM head's cross-entropy without a [B, T, V] logits array.

GPT-2's head is the token embedding E [V, d] (tied to `wte`, frozen in CoMiGS). The full logits of
a batch are N x V float32 (8 x 128 tokens x 50,257 = 206 MB, and the backward keeps exp(logits)
and builds d logits of the same size); here they exist one vocabulary block [N, block] at a time,
in a scan with an online logsumexp (the blocks that fit whole, then the remaining V mod block
columns as one more step: nothing is masked).

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

from comigs_jax.model.precision import wide


def full_logits(x: jax.Array, embedding: jax.Array) -> jax.Array:
    """x [..., d] (activation dtype), embedding [V, d] -> logits [..., V] float32 (as nn.Embed.attend)."""
    return jnp.dot(x, embedding.astype(x.dtype).T).astype(wide(x.dtype))


def _blocks(emb, block):
    """(full blocks [n_full, block, d] as a reshape of the first n_full * block rows, tail [V mod
    block, d] or None): the scan runs over whole blocks and the tail is one static step, so no
    column is masked or counted twice."""
    vocab, d = emb.shape
    n_full = vocab // block
    full = emb[: n_full * block].reshape(n_full, block, d)
    return full, (emb[n_full * block:] if vocab % block else None)


def _label_logit(x, emb, labels):
    """[N] float32 logit of each token's label: x . E[label] (the matching column of x @ E^T)."""
    return jnp.einsum("nd,nd->n", x, emb[labels], preferred_element_type=wide(x.dtype))


def _scan(x, emb, block, with_grad):
    """One pass over the vocabulary with an online logsumexp. Returns lse [N] and, with_grad,
    softmax(x E^T) @ E [N, d] float32."""
    n, d = x.shape
    f32 = wide(x.dtype)  # float32 (float64 for a float64 model)
    full, tail = _blocks(emb, block)

    def step(carry, e_blk):
        m, s, acc = carry
        z = full_logits(x, e_blk)                                         # [N, block] float32
        m_new = jnp.maximum(m, z.max(-1))                                 # running max (the first block is finite)
        rescale = jnp.exp(m - m_new)
        p = jnp.exp(z - m_new[:, None])                                   # [N, block]
        s = s * rescale + p.sum(-1)
        if with_grad:
            acc = acc * rescale[:, None] + jnp.dot(p.astype(x.dtype), e_blk, preferred_element_type=f32)
        return (m_new, s, acc), None

    carry = (jnp.full((n,), -jnp.inf, f32), jnp.zeros((n,), f32), jnp.zeros((n, d), f32) if with_grad else None)
    carry, _ = jax.lax.scan(step, carry, full)
    if tail is not None:
        carry, _ = step(carry, tail)
    m, s, acc = carry
    lse = m + jnp.log(s)
    return lse, None if acc is None else acc / s[:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked_ce(x, embedding, labels, block):
    emb = embedding.astype(x.dtype)
    lse, _ = _scan(x, emb, block, with_grad=False)
    return lse - _label_logit(x, emb, labels)


def _blocked_ce_fwd(x, embedding, labels, block):
    xv, emb = x.value, embedding.value.astype(x.value.dtype)
    lab = labels.value
    lse, soft_e = _scan(xv, emb, block, with_grad=x.perturbed)
    # d ce / d x = softmax @ E - E[label], kept in the activation dtype: [N, d] instead of [N, V].
    dce_dx = None if soft_e is None else (soft_e - emb[lab].astype(wide(xv.dtype))).astype(xv.dtype)
    res = (dce_dx, (xv, lse, embedding.value) if embedding.perturbed else None, lab)
    return lse - _label_logit(xv, emb, lab), res


def _blocked_ce_bwd(block, res, g):
    dce_dx, for_emb, labels = res
    g = g.astype(wide(g.dtype))                                            # [N]
    dx = None if dce_dx is None else (g[:, None] * dce_dx).astype(dce_dx.dtype)
    d_emb = None
    if for_emb is not None:  # only if the head is trained: recompute each block's softmax
        x, lse, embedding = for_emb
        emb = embedding.astype(x.dtype)
        full, tail = _blocks(emb, block)
        # d ce / d E = softmax^T (g x) - scatter of g x onto the label rows
        gx = (g[:, None] * x.astype(wide(x.dtype))).astype(x.dtype)        # [N, d]

        def grad_block(e_blk):
            p = jnp.exp(full_logits(x, e_blk) - lse[:, None])              # [N, block] softmax
            return jnp.dot(p.astype(x.dtype).T, gx, preferred_element_type=wide(x.dtype))  # [block, d]

        d_emb = jax.lax.map(grad_block, full).reshape(-1, emb.shape[1])
        if tail is not None:
            d_emb = jnp.concatenate([d_emb, grad_block(tail)], 0)
        d_emb = d_emb.at[labels].add(-gx.astype(wide(gx.dtype))).astype(embedding.dtype)
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
