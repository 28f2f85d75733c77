"""Parameter and accumulation dtypes, derived from the activation dtype.

The engine computes in float32 (parameters, logits, router, losses, aggregation) whatever the
activation dtype, bfloat16 included. A model whose activation dtype is "float64" (which needs
`jax.enable_x64`) keeps everything in float64 instead: the tests that compare two programs of the
same math (chunked vs all at once, vmap vs loop, stacked vs separate) run there, where different
summation orders agree to ~1e-12 and a real bug still shows (in float32 they may differ in the last
bits, which Adam amplifies for near-zero gradients).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def wide(dtype) -> jnp.dtype:
    """The dtype parameters are stored in and sums accumulate in, for values of `dtype`: float32
    for float32 and narrower (bfloat16), float64 for float64."""
    return jnp.promote_types(dtype, jnp.float32)


def missing_x64(dtype_name: str) -> bool:
    """Whether `dtype_name` is float64 without 64-bit JAX, where it would silently compute in
    float32 (every config check of a dtype asks this)."""
    return dtype_name == "float64" and not jax.config.jax_enable_x64


def check_x64(dtype_name: str) -> None:
    """ValueError (one line) for a float64 model without 64-bit JAX."""
    if missing_x64(dtype_name):
        raise ValueError("dtype='float64' needs 64-bit JAX: run under jax.enable_x64(True) "
                         "(or set JAX_ENABLE_X64=1); allowed without it: float32, bfloat16")


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, is_causal: bool = False,
                          mask: jax.Array | None = None) -> jax.Array:
    """jax.nn.dot_product_attention (q [B, T, N, H]; k, v [B, S, K, H] with N a multiple of K:
    grouped-query attention; mask broadcastable to [B, N, T, S]; is_causal: query t sees keys
    <= t) -> [B, T, N, H]. Its XLA path always takes the softmax in float32, so a float64 model
    gets the same math here with the softmax in float64; every other dtype calls it unchanged."""
    if q.dtype != jnp.float64:
        return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal, mask=mask)
    b, t, n, h = q.shape
    s, kv = k.shape[1], k.shape[2]
    logits = jnp.einsum("btkgh,bskh->bkgts", q.reshape(b, t, kv, n // kv, h), k) / jnp.sqrt(float(h))
    keep = jnp.ones((t, s), bool)
    if is_causal:
        keep = jnp.tril(keep)
    if mask is not None:
        keep = keep & jnp.broadcast_to(mask, (b, n, t, s)).reshape(b, kv, n // kv, t, s)
    logits = jnp.where(keep, logits, jnp.finfo(logits.dtype).min)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(b, t, n, h)
