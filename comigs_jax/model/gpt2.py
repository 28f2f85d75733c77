"""GPT-2 as Flax Linen modules, applied functionally: `GPT2(cfg).apply({"params": p}, tokens)`.

Parameter names mirror Hugging Face's (`wte`, `wpe`, `h_{i}/attn/c_attn`, ...), so loading a
checkpoint is a rename. The seam for CoMiGS is the config: `cfg.attn_lora` turns the attention
projections into `LoRADense` with trainable A, B; `cfg.moe` turns the MLP into a mixture of LoRA
experts with a router (comigs_jax.model.moe). Without them this is the plain GPT-2.
"""
from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from comigs_jax.model import moe as moe_lib
from comigs_jax.model.config import GPT2Config
from comigs_jax.model.kv_cache import kv_cache_update
from comigs_jax.model.lora import LoRADense
from comigs_jax.model.precision import dot_product_attention, wide


def _proj_init(cfg: GPT2Config):
    # GPT-2's residual projections start smaller, scaled by 1/sqrt(2 * n_layer).
    return nn.initializers.normal(0.02 / (2 * cfg.n_layer) ** 0.5)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused QKV projection. x [B, T, d] -> [B, T, d].

    cache=(k, v) [B, S, heads, hd] (decoding): x holds positions index..index+T-1; their keys and
    values are written into the cache at `index` and the queries attend to cache positions
    <= their own. Returns (y, new cache) then."""

    cfg: GPT2Config

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True, cache=None, index=None):
        cfg = self.cfg
        b, t, d = x.shape
        dtype = jnp.dtype(cfg.dtype)
        qkv = LoRADense(3 * d, cfg.attn_lora, dtype, name="c_attn")(x, deterministic)
        q, k, v = (a.reshape(b, t, cfg.n_head, d // cfg.n_head) for a in jnp.split(qkv, 3, -1))
        if cache is None:
            y = dot_product_attention(q, k, v, is_causal=True).reshape(b, t, d)
            return LoRADense(d, cfg.attn_lora, dtype, _proj_init(cfg), name="c_proj")(y, deterministic)
        (k, v), mask = kv_cache_update(cache, k, v, index)
        y = dot_product_attention(q, k, v, mask=mask).reshape(b, t, d)
        return LoRADense(d, cfg.attn_lora, dtype, _proj_init(cfg), name="c_proj")(y, deterministic), (k, v)


class MLP(nn.Module):
    """The plain GPT-2 MLP: c_fc, tanh-GELU, c_proj. h [B, T, d] -> [B, T, d]."""

    cfg: GPT2Config

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        d, dtype = self.cfg.n_embd, jnp.dtype(self.cfg.dtype)
        u = nn.gelu(LoRADense(4 * d, None, dtype, name="c_fc")(h), approximate=True)
        return LoRADense(d, None, dtype, _proj_init(self.cfg), name="c_proj")(u)


class Block(nn.Module):
    """Pre-LN transformer block: x += attn(ln_1 x); x += mlp(ln_2 x).

    With cfg.moe the MLP is a mixture of LoRA experts. Returns (x, aux) where aux holds this
    layer's load-balancing loss "lb" (scalar) and routing statistics "router_prob" and
    "selection" ([E] each); aux is empty for the plain MLP.
    """

    cfg: GPT2Config

    @nn.compact
    def __call__(self, x, expert_mask: Optional[jax.Array], deterministic: bool = True, cache=None, index=None):
        cfg, eps = self.cfg, self.cfg.layer_norm_epsilon
        dtype = jnp.dtype(cfg.dtype)
        h = nn.LayerNorm(eps, dtype=dtype, name="ln_1")(x)
        if cache is None:
            x = x + CausalSelfAttention(cfg, name="attn")(h, deterministic)
        else:  # decoding: the layer's KV cache in, the updated one out (aux["cache"])
            a, cache = CausalSelfAttention(cfg, name="attn")(h, deterministic, cache, index)
            x = x + a
        h = nn.LayerNorm(eps, dtype=dtype, name="ln_2")(x)
        if cfg.moe is None:
            x, aux = x + MLP(cfg, name="mlp")(h), {}
            return (x, aux) if cache is None else (x, {"cache": cache})

        weights, mask, route = moe_lib.mixture_weights(h, expert_mask, cfg.moe)
        # Per-token expert weights [B, T, E], collected only when "intermediates" is mutable
        # (routing pictures); otherwise sow is a no-op.
        self.sow("intermediates", "gate", weights)
        x = x + moe_lib.MoEMLP(cfg.moe, cfg.n_embd, cfg.n_layer, dtype, remat=cfg.remat, name="mlp")(h, weights, deterministic)
        aux = moe_lib.mixture_aux(route, x, mask, cfg.moe)
        return (x, aux) if cache is None else (x, {**aux, "cache": cache})


# Block with remat "block": the backward keeps only each block's input and recomputes the rest.
# Argument 3 (self is 0) is `deterministic`, a Python bool that must stay static. The lifted
# transform keeps the module's name, so parameters stay h_{i}/... .
RematBlock = nn.remat(Block, static_argnums=(3,))


class GPT2(nn.Module):
    """GPT-2 language model with the LM head tied to the token embedding.

    tokens [B, T] int -> logits [B, T, V] float32, aux. aux stacks the blocks' aux over layers:
    "lb" [L], "router_prob" [L, E], "selection" [L, E] (empty without cfg.moe).
    expert_mask [E] bool marks the experts this user has (default: all).
    return_hidden: return the final hidden state (after ln_f) [B, T, d] in the activation dtype
    instead of the logits, for a loss that applies the head itself (comigs_jax.model.head).
    cache (decoding, init_cache's {"k", "v"} [L, B, S, heads, hd]) and index (int scalar): the
    tokens are positions index..index+T-1 of a sequence whose earlier keys and values the cache
    holds; aux["cache"] is then the cache with these tokens' written in (the same logits as a
    full forward of the sequence; comigs_jax.model.decode).
    """

    cfg: GPT2Config

    @nn.compact
    def __call__(self, tokens: jax.Array, expert_mask: Optional[jax.Array] = None,
                 deterministic: bool = True, return_hidden: bool = False, cache=None, index=None):
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        init = nn.initializers.normal(0.02)
        wte = nn.Embed(cfg.vocab_size, cfg.n_embd, dtype=dtype, embedding_init=init, name="wte")
        wpe = nn.Embed(cfg.n_positions, cfg.n_embd, dtype=dtype, embedding_init=init, name="wpe")
        positions = jnp.arange(tokens.shape[-1])
        x = wte(tokens) + wpe(positions if cache is None else index + positions)
        block = RematBlock if cfg.remat == "block" else Block
        auxes = []
        for i in range(cfg.n_layer):
            if cache is None:
                x, aux = block(cfg, name=f"h_{i}")(x, expert_mask, deterministic)
            else:
                x, aux = block(cfg, name=f"h_{i}")(x, expert_mask, deterministic,
                                                   (cache["k"][i], cache["v"][i]), index)
            auxes.append(aux)
        x = nn.LayerNorm(cfg.layer_norm_epsilon, dtype=dtype, name="ln_f")(x)
        aux = jax.tree.map(lambda *a: jnp.stack(a), *auxes)
        if cache is not None:
            k, v = aux.pop("cache")
            aux["cache"] = {"k": k, "v": v}
        if return_hidden:
            return x, aux
        return wte.attend(x).astype(wide(dtype)), aux


def token_gate_weights(cfg: GPT2Config, params: dict, tokens: jax.Array,
                       expert_mask: Optional[jax.Array] = None) -> jax.Array:
    """Per-token expert weights [L, B, T, E] of a mixture-of-experts model."""
    _, state = GPT2(cfg).apply({"params": params}, tokens, expert_mask, mutable=["intermediates"])
    inter = state["intermediates"]
    return jnp.stack([inter[f"h_{i}"]["gate"][0] for i in range(cfg.n_layer)])


@functools.partial(jax.jit, static_argnums=(0, 2))
def init_params(cfg: GPT2Config, key: jax.Array, seq_len: int = 8) -> dict:
    """Random parameters of the whole model (base and adapters), a plain nested dict. Jitted: one
    compile per config instead of an op-by-op trace of the whole forward (same values)."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return GPT2(cfg).init(key, tokens)["params"]


def param_shapes(cfg: GPT2Config) -> dict:
    """The parameter tree as ShapeDtypeStructs, without allocating anything."""
    return jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
