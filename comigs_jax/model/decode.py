"""Sampling from a language model of either family with a KV cache.

The cache is an explicit pytree, {"k", "v"} [L, B, S, kv heads, head dim] (`init_cache`), passed
to the model's `cache=` / `index=` arguments (gpt2.GPT2, llama.Llama): a call on tokens at
positions index..index+T-1 writes their keys and values into it and attends to every position
before them, so a prefill of the prompt followed by one-token steps gives the logits of a full
forward of the sequence (tests/test_generate.py checks both families, mixture on, to 1e-5).

`generate` is one jitted program: the prefill, then a `lax.scan` over the new tokens (sampling
with temperature and top-k, or greedy at temperature 0). Besides the tokens it returns, per token
of the whole sequence, the weight the routers give the generalists (summed over generalist slots,
averaged over layers): what the routing pictures colour tokens by.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from comigs_jax.model.kv_cache import init_cache
from comigs_jax.model.family import family_of
from comigs_jax.model.lm import ModelConfig, language_model

__all__ = ["init_cache", "forward_cached", "generate"]


def _gates(cfg: ModelConfig, state: dict) -> Optional[jax.Array]:
    """The sown per-token expert weights as [L, B, T, E] (None without a router)."""
    inter = state.get("intermediates", {})
    if not inter:
        return None
    return family_of(cfg).sown_gates(inter, cfg.n_layer)


def forward_cached(cfg: ModelConfig, params: dict, tokens: jax.Array, cache: dict, index,
                   expert_mask: Optional[jax.Array] = None):
    """(logits [B, T, V] float32, the updated cache, gates [L, B, T, E] or None) of tokens [B, T]
    at positions index..index+T-1."""
    (logits, aux), state = language_model(cfg).apply(
        {"params": params}, tokens, expert_mask, cache=cache, index=index, mutable=["intermediates"])
    return logits, aux["cache"], _gates(cfg, state)


def _sample(key, logits: jax.Array, temperature: float, top_k: int) -> jax.Array:
    """[B, V] logits -> [B] token ids: greedy at temperature 0, else softmax(logits / T) over
    the top_k largest (0: all)."""
    if temperature == 0:
        return jnp.argmax(logits, -1)
    z = logits / temperature
    if 0 < top_k < z.shape[-1]:
        kth = jax.lax.top_k(z, top_k)[0][..., -1:]
        z = jnp.where(z < kth, -jnp.inf, z)
    return jax.random.categorical(key, z, -1)


@functools.partial(jax.jit, static_argnames=("cfg", "n_new", "temperature", "top_k"))
def generate(cfg: ModelConfig, params: dict, prompt: jax.Array, key: jax.Array, *, n_new: int,
             temperature: float = 1.0, top_k: int = 0, expert_mask: Optional[jax.Array] = None):
    """Sample n_new tokens after prompt [B, P] (P + n_new <= the model's context).

    Returns (tokens [B, P + n_new] int32, generalist weight [B, P + n_new] or None without a
    router: per token, the routers' weight on the generalist slots averaged over layers; for a
    generated token, the weight when it was the input, as in a full forward of the sequence)."""
    b, p = prompt.shape
    cache = init_cache(cfg, b, p + n_new)
    logits, cache, gates = forward_cached(cfg, params, prompt, cache, 0, expert_mask)
    n_gen = cfg.moe.n_generalists if cfg.moe is not None else 0

    def share(g):  # [L, B, T, E] -> [B, T]
        return g[..., :n_gen].sum(-1).mean(0)

    def step(carry, i):
        cache, last, key = carry
        key, sub = jax.random.split(key)
        tok = _sample(sub, last, temperature, top_k).astype(jnp.int32)  # [B]
        logits, cache, g = forward_cached(cfg, params, tok[:, None], cache, p + i, expert_mask)
        return (cache, logits[:, -1], key), (tok, None if g is None else share(g)[:, 0])

    # the last new token is sampled from the final logits and never fed back: n_new - 1 model steps
    (cache, last, key), (toks, shares) = jax.lax.scan(step, (cache, logits[:, -1], key), jnp.arange(n_new - 1))
    key, sub = jax.random.split(key)
    final = _sample(sub, last, temperature, top_k).astype(jnp.int32)
    tokens = jnp.concatenate([prompt.astype(jnp.int32), toks.T, final[:, None]], 1)
    if gates is None:
        return tokens, None
    # the final token's weight needs one more step: its routing as an input
    _, _, g_last = forward_cached(cfg, params, final[:, None], cache, p + n_new - 1, expert_mask)
    weights = jnp.concatenate([share(gates), shares.T, share(g_last)], 1)
    return tokens, weights
