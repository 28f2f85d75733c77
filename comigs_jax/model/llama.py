"""Llama as Flax Linen modules, with GPT-2's conventions: `Llama(cfg).apply({"params": p}, tokens)`.

Same call signature, outputs, dtypes and adapter seams as comigs_jax.model.gpt2.GPT2: `cfg.attn_lora`
puts LoRA on q/k/v/o_proj, `cfg.moe` turns the SwiGLU MLP into a mixture of LoRA experts with a
router (gating, masks and load balancing from comigs_jax.model.moe). Parameter names mirror
Hugging Face's (`embed_tokens`, `layers/self_attn/q_proj`, ...; kernels [in, out], no biases),
so loading a checkpoint (comigs_jax.model.hf_llama) is a rename, a transpose and a stack.

The blocks are one `nn.scan` over layers: every leaf under `layers` has a leading [L] axis, and
the block is traced and compiled once, not L times. SmolLM2-135M's 30 unrolled layers took minutes
to compile a training round on CPU; scanned, the program does not grow with L.

Architecture: pre-RMSNorm blocks, rotary position embeddings in HF's rotate_half convention (the
two halves of each head's dimension rotate together), grouped-query attention (query head n reads
key/value head n // (n_head / n_kv_head), as HF's repeat_kv), SwiGLU MLP, optionally tied head.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from comigs_jax.model import moe as moe_lib
from comigs_jax.model import noisy_gate
from comigs_jax.model.config import LlamaConfig, MoEConfig
from comigs_jax.model.kv_cache import kv_cache_update
from comigs_jax.model.lora import LoRADense
from comigs_jax.model.precision import dot_product_attention, wide

_INIT = nn.initializers.normal(0.02)  # HF Llama's initializer_range, for every matrix


# ----------------------------------------------------------------------------- rotary embeddings
def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """[head_dim / 2] float32 inverse frequencies theta^(-2i / head_dim), with the "llama3"
    adjustment when cfg.rope_scaling is set. Static (numpy): it depends on the config only."""
    hd = cfg.dim_head
    inv = (1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd))).astype(np.float32)
    sc = cfg.rope_scaling
    if sc is None:
        return inv
    # Long wavelengths (low frequencies) are stretched by `factor`, short ones kept, the band
    # between interpolated linearly in old_context / wavelen.
    old = sc.original_max_position_embeddings
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / sc.low_freq_factor, inv / sc.factor, inv)
    smooth = (old / wavelen - sc.low_freq_factor) / (sc.high_freq_factor - sc.low_freq_factor)
    smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
    medium = (wavelen >= old / sc.high_freq_factor) & (wavelen <= old / sc.low_freq_factor)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(cfg: LlamaConfig, t: int, start=0) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [T, head_dim] float32 for positions start..start+T-1 (start may be traced:
    decoding); each frequency appears twice (the first and second half of the head dimension), HF's layout."""
    positions = jnp.arange(t, dtype=jnp.float32)
    if not (isinstance(start, int) and start == 0):  # the full forward's program stays as it was
        positions = positions + jnp.asarray(start, jnp.float32)
    angles = positions[:, None] * jnp.asarray(rope_inv_freq(cfg))[None]
    angles = jnp.concatenate([angles, angles], -1)                                 # [T, hd]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, heads, hd] rotated by position: x cos + rotate_half(x) sin, rotate_half(x) =
    [-x2, x1] with x1, x2 the two halves. Computed in float32, returned in x's dtype."""
    xf = x.astype(wide(x.dtype))
    x1, x2 = jnp.split(xf, 2, -1)
    rot = jnp.concatenate([-x2, x1], -1)
    return (xf * cos[:, None] + rot * sin[:, None]).astype(x.dtype)


# ----------------------------------------------------------------------------- layers
class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * scale over the last axis, normalised in float32 (as HF), output
    in `dtype`. x [..., d] -> [..., d]."""

    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        xf = x.astype(wide(x.dtype))
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + self.eps)
        # HF casts the normalised input back to the activation dtype before the scale.
        return xf.astype(self.dtype) * scale.astype(self.dtype)


class LlamaAttention(nn.Module):
    """Causal grouped-query self-attention with RoPE. x [B, T, d], cos/sin [T, hd] -> [B, T, d].
    cache=(k, v) [B, S, kv heads, hd] and index: decoding, as gpt2.CausalSelfAttention (returns
    (y, new cache))."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, deterministic: bool = True,
                 cache=None, index=None):
        cfg = self.cfg
        b, t, _ = x.shape
        hd, dtype = cfg.dim_head, jnp.dtype(cfg.dtype)
        proj = functools.partial(LoRADense, lora=cfg.attn_lora, dtype=dtype, kernel_init=_INIT, use_bias=False)
        q = proj(cfg.n_head * hd, name="q_proj")(x, deterministic).reshape(b, t, cfg.n_head, hd)
        k = proj(cfg.n_kv_head * hd, name="k_proj")(x, deterministic).reshape(b, t, cfg.n_kv_head, hd)
        v = proj(cfg.n_kv_head * hd, name="v_proj")(x, deterministic).reshape(b, t, cfg.n_kv_head, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # K < N heads is grouped-query attention: head n reads kv head n // (N / K).
        if cache is None:
            y = dot_product_attention(q, k, v, is_causal=True).reshape(b, t, cfg.n_head * hd)
            return proj(cfg.n_embd, name="o_proj")(y, deterministic)
        (k, v), mask = kv_cache_update(cache, k, v, index)
        y = dot_product_attention(q, k, v, mask=mask).reshape(b, t, cfg.n_head * hd)
        return proj(cfg.n_embd, name="o_proj")(y, deterministic), (k, v)


class LlamaMLP(nn.Module):
    """The plain SwiGLU MLP: down(silu(gate(h)) * up(h)). h [B, T, d] -> [B, T, d]."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        dense = functools.partial(LoRADense, lora=None, dtype=dtype, kernel_init=_INIT, use_bias=False)
        f = cfg.intermediate_size
        a = nn.silu(dense(f, name="gate_proj")(h)) * dense(f, name="up_proj")(h)
        return dense(cfg.n_embd, name="down_proj")(a)


def _swiglu_expert_core(g, u, h_ga, h_ua, gate_b, up_b, w, down_a, drop_key, *, scale: float,
                        keep_prob: float):
    """Every expert's own part of the SwiGLU MLP (moe._expert_core for Llama).

    g, u [N, F] frozen gate/up outputs; h_ga, h_ua [N, E, r] = h A_gate, h A_up; gate_b, up_b
    [E, r, F]; w [N, E]; down_a [E, F, r] -> mixed [N, F] = sum_e w_e a_e and a_A [E, N, r] =
    dropout(a_e) A_down, where a_e = silu(g + s h_ga B_gate) * (u + s h_ua B_up).
    Both pre-activations [E, N, F] are named "moe_pre", so moe's checkpoint policy keeps them
    (silu and the product are recomputed) or, with remat "moe", nothing [E, N, F].
    """
    gate = checkpoint_name(g[None] + scale * jnp.einsum("ner,erf->enf", h_ga, gate_b), "moe_pre")
    up = checkpoint_name(u[None] + scale * jnp.einsum("ner,erf->enf", h_ua, up_b), "moe_pre")
    a = nn.silu(gate) * up                                                          # [E, N, F]
    mixed = jnp.einsum("ne,enf->nf", w, a)                                          # [N, F]
    if drop_key is not None:  # nn.Dropout's own formula, so the mask equals the module's
        keep = jax.random.bernoulli(drop_key, p=keep_prob, shape=a.shape)
        a = jax.lax.select(keep, a / keep_prob, jnp.zeros_like(a))
    return mixed, jnp.einsum("enf,efr->enr", a, down_a)                              # [E, N, r]


class LlamaMoEMLP(nn.Module):
    """sum_e w_e expert_e(h), expert_e = the frozen SwiGLU MLP with expert e's LoRA on gate, up, down.

    The cheap form of moe.MoEMLP: the frozen gate and up matmuls run once for all experts, each
    expert adds its rank-r corrections and takes its own silu(gate) * up [E, N, F], the frozen down
    matmul runs once on the weight-mixed activations, and each expert's down LoRA reads its own
    activation. h [B, T, d], weights [B, T, E] -> [B, T, d]. Dropout (rate cfg.lora.dropout) as
    MoEMLP: one mask on h, shared by the gate and up A factors of every expert, and one on each
    expert's activation before A_down.
    """

    cfg: MoEConfig
    d_model: int
    d_hidden: int
    dtype: jnp.dtype = jnp.float32
    remat: str = "none"

    @nn.compact
    def __call__(self, h: jax.Array, weights: jax.Array, deterministic: bool = True) -> jax.Array:
        d, f, r = self.d_model, self.d_hidden, self.cfg.lora.rank
        dt, s = self.dtype, self.cfg.lora.scale
        dense = functools.partial(LoRADense, lora=None, dtype=dt, kernel_init=_INIT, use_bias=False)
        # gate_A, up_A [n, d, r]; gate_B, up_B [n, r, F]; down_A [n, F, r]; down_B [n, r, d]
        groups = [moe_lib.ExpertLoRAs(n, r, (("gate", d, f), ("up", d, f), ("down", f, d)), wide(dt), name=name)()
                  for name, n in (("generalists", self.cfg.n_generalists),
                                  ("specialists", self.cfg.n_specialists)) if n > 0]
        gate_a, gate_b, up_a, up_b, down_a, down_b = (
            jnp.concatenate(parts, 0).astype(dt) for parts in zip(*groups))

        rate = self.cfg.lora.dropout
        drop = nn.Dropout(rate)
        det = deterministic or rate == 0
        lead, n_e = h.shape[:-1], gate_a.shape[0]
        h = h.astype(dt).reshape(-1, d)                                        # [N, d]
        w = weights.astype(dt).reshape(-1, n_e)                                # [N, E]
        g = dense(f, name="gate_proj")(h)                                      # [N, F]: once for all experts
        u = dense(f, name="up_proj")(h)                                        # [N, F]
        # Both A products of every expert in one matmul: [N, d] @ [d, 2 E r].
        a_cat = jnp.concatenate([gate_a, up_a], 0).transpose(1, 0, 2).reshape(d, 2 * n_e * r)
        h_a = (drop(h, deterministic=det) @ a_cat).reshape(-1, 2 * n_e, r)
        h_ga, h_ua = h_a[:, :n_e], h_a[:, n_e:]                                # [N, E, r] each
        drop_key = None if det else drop.make_rng("dropout")
        core = jax.checkpoint(functools.partial(_swiglu_expert_core, scale=s, keep_prob=1.0 - rate),
                              policy=moe_lib.CORE_POLICY[self.remat])
        mixed, a_a = core(g, u, h_ga, h_ua, gate_b, up_b, w, down_a, drop_key)  # [N, F], [E, N, r]
        a_a = (w.T[..., None] * a_a).transpose(1, 0, 2).reshape(-1, n_e * r)   # [N, E*r]
        out = dense(d, name="down_proj")(mixed) + s * (a_a @ down_b.reshape(n_e * r, d))
        return out.reshape(*lead, d)


class LlamaBlock(nn.Module):
    """Pre-RMSNorm block: x += attn(input_layernorm x); x += mlp(post_attention_layernorm x).

    With cfg.moe the MLP is a mixture of LoRA experts routed per token exactly as GPT-2's Block
    routes (bias-free float32 router, top-k gate, masks, load balancing). Returns (x, aux): aux
    holds "lb" (scalar), "router_prob" and "selection" ([E] each), empty for the plain MLP.
    """

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x, rope, expert_mask: Optional[jax.Array], deterministic: bool = True,
                 cache=None, index=None):
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        h = RMSNorm(cfg.rms_norm_eps, dtype, name="input_layernorm")(x)
        if cache is None:
            x = x + LlamaAttention(cfg, name="self_attn")(h, *rope, deterministic)
        else:  # decoding: this layer's KV cache in, the updated one out (aux["cache"])
            a, cache = LlamaAttention(cfg, name="self_attn")(h, *rope, deterministic, cache, index)
            x = x + a
        h = RMSNorm(cfg.rms_norm_eps, dtype, name="post_attention_layernorm")(x)
        if cfg.moe is None:
            x = x + LlamaMLP(cfg, name="mlp")(h)
            return (x, {}) if cache is None else (x, {"cache": cache})

        noisy = cfg.moe.router == "noisy_topk"  # the reference's Llama gate (model/noisy_gate.py)
        weights, mask, route = (noisy_gate.mixture_weights(h, expert_mask, cfg.moe, deterministic) if noisy
                                else moe_lib.mixture_weights(h, expert_mask, cfg.moe))
        self.sow("intermediates", "gate", weights)  # [B, T, E], only when "intermediates" is mutable
        x = x + LlamaMoEMLP(cfg.moe, cfg.n_embd, cfg.intermediate_size, dtype, remat=cfg.remat,
                            name="mlp")(h, weights, deterministic)
        aux = noisy_gate.mixture_aux(route, mask) if noisy else moe_lib.mixture_aux(route, x, mask, cfg.moe)
        return (x, aux) if cache is None else (x, {**aux, "cache": cache})


# remat "block": the backward keeps each block's input only. Argument 4 (self is 0) is
# `deterministic`, a Python bool that must stay static; the lifted module keeps its parameter names.
RematLlamaBlock = nn.remat(LlamaBlock, static_argnums=(4,))


def scanned_blocks(cfg: LlamaConfig, cached: bool = False):
    """The cfg.n_layer blocks as one scanned module: (x [B, T, d], rope, expert_mask,
    deterministic) -> (x, aux stacked over layers). Parameters and sown gates get a leading [L]
    axis; each layer draws its own initial parameters and dropout masks. cached: decoding, two
    more arguments, the layers' KV caches (scanned over, [L, ...]) and the index (broadcast)."""
    block = RematLlamaBlock if cfg.remat == "block" and not cached else LlamaBlock
    extra = (0, nn.broadcast) if cached else ()
    return nn.scan(block, variable_axes={"params": 0, "intermediates": 0},
                   split_rngs={"params": True, "dropout": True, "router_noise": True, "gate_w": True},
                   in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, *extra), length=cfg.n_layer)


class Llama(nn.Module):
    """Llama language model, GPT2's interface.

    tokens [B, T] int -> logits [B, T, V] float32, aux. aux stacks the blocks' aux over layers:
    "lb" [L], "router_prob" [L, E], "selection" [L, E] (empty without cfg.moe).
    expert_mask [E] bool marks the experts this user has (default: all).
    return_hidden: return the final normed hidden state [B, T, d] in the activation dtype instead
    of the logits. The head is the token embedding when cfg.tie_word_embeddings, else lm_head.
    cache and index: decoding, as GPT2 (aux["cache"] the updated cache).
    """

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, expert_mask: Optional[jax.Array] = None,
                 deterministic: bool = True, return_hidden: bool = False, cache=None, index=None):
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        embed = nn.Embed(cfg.vocab_size, cfg.n_embd, dtype=dtype, embedding_init=_INIT, name="embed_tokens")
        x = embed(tokens)
        if cache is None:
            rope = rope_tables(cfg, tokens.shape[-1])  # once, shared by every layer
            x, aux = scanned_blocks(cfg)(cfg, name="layers")(x, rope, expert_mask, deterministic)
        else:
            rope = rope_tables(cfg, tokens.shape[-1], index)
            x, aux = scanned_blocks(cfg, cached=True)(cfg, name="layers")(
                x, rope, expert_mask, deterministic, (cache["k"], cache["v"]), index)
            k, v = aux.pop("cache")
            aux["cache"] = {"k": k, "v": v}
        x = RMSNorm(cfg.rms_norm_eps, dtype, name="norm")(x)
        if return_hidden:
            return x, aux
        if cfg.tie_word_embeddings:
            return embed.attend(x).astype(wide(dtype)), aux
        head = LoRADense(cfg.vocab_size, None, dtype, _INIT, use_bias=False, name="lm_head")
        return head(x).astype(wide(dtype)), aux


def llama_token_gate_weights(cfg: LlamaConfig, params: dict, tokens: jax.Array,
                             expert_mask: Optional[jax.Array] = None) -> jax.Array:
    """Per-token expert weights [L, B, T, E] of a mixture-of-experts Llama."""
    _, state = Llama(cfg).apply({"params": params}, tokens, expert_mask, mutable=["intermediates"])
    return state["intermediates"]["layers"]["gate"][0]  # sown once per layer, stacked by the scan


@functools.partial(jax.jit, static_argnums=(0, 2))
def init_llama_params(cfg: LlamaConfig, key: jax.Array, seq_len: int = 8) -> dict:
    """Random parameters of the whole model (base and adapters), a plain nested dict. Jitted as
    gpt2.init_params: one compile per config instead of an op-by-op trace."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return Llama(cfg).init(key, tokens)["params"]


def llama_param_shapes(cfg: LlamaConfig) -> dict:
    """The parameter tree as ShapeDtypeStructs, without allocating anything."""
    return jax.eval_shape(lambda k: init_llama_params(cfg, k), jax.random.key(0))
