"""The KV cache of decoding, shared by both families (gpt2.GPT2, llama.Llama; comigs_jax.model.decode
samples with it): an explicit pytree {"k", "v"} [L, B, S, kv heads, head dim]."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def kv_cache_update(cache, k: jax.Array, v: jax.Array, index):
    """((k, v) cache [B, S, heads, hd] with k, v [B, T, heads, hd] written at position `index`,
    the attention mask [1, 1, T, S]: query index + i sees cache positions <= index + i)."""
    ck, cv = cache
    at = (0, index, 0, 0)
    ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), at)
    cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), at)
    t, s = k.shape[1], ck.shape[1]
    mask = jnp.arange(s)[None, :] <= (index + jnp.arange(t))[:, None]
    return (ck, cv), mask[None, None]


def init_cache(cfg, batch: int, length: int) -> dict:
    """An empty KV cache of either family for `length` positions: {"k", "v"} [L, B, S, kv heads,
    head dim] in the activation dtype (GPT-2: heads = n_head; Llama: n_kv_head)."""
    heads = getattr(cfg, "n_kv_head", cfg.n_head)
    hd = getattr(cfg, "dim_head", cfg.n_embd // cfg.n_head)
    z = jnp.zeros((cfg.n_layer, batch, length, heads, hd), jnp.dtype(cfg.dtype))
    return {"k": z, "v": z}
