r"""A capacity model: bytes per user, FLOPs per round, users per device, devices for U users.

    python -m comigs_jax.capacity                                  # configs/capacity.py: 1,000 users of GPT-2 124M
    python -m comigs_jax.capacity --config.users=5000 --config.train.batch_size=16
    python -m comigs_jax.capacity --config=configs/capacity.py:tiny --config.measure=16,64
    python -m comigs_jax.capacity --config.train.user_chunk=8 --config.model.remat=block --config.train.batch_size=8

Everything here is arithmetic on the config's shapes (no tracing, no device): `plan(model_cfg, tc,
method, n_users)` returns a dict; `format_plan` renders it as markdown. The command line takes
`--config=FILE[:ARG]` and `--config.key=value` as experiments.run does (configs/capacity.py: the
`model` and `train` groups are configs/base.py's), and builds the engine's configs through the
same functions (comigs_jax.configuration.engine_configs) as experiments.bench, whose FLOPs per
round are `round_flops` here. docs/scaling.md explains
the numbers and checks them against the compiled program (tests/test_capacity.py).

Memory of one user (the leading user axis of everything the round program holds per user):

- state: trainable params (float32, by role), the expert AdamW state (mu, nu: float32 per
  parameter it updates, plus two int32 counters: Adam's and the cosine schedule's), the router
  AdamW state (alternating methods), the step counter and PRNG key, faithful mode's leak buffers;
- tokens: the user's token arrays on device (train + validation, padded to the longest user);
- step: the working set of one training step, the largest of the round (expert step): the
  activations that the backward pass keeps (`activation_tensors`, in one of two profiles:
  "accelerator", what XLA's GPU backend keeps after fusion, used for the targets; "cpu", what
  XLA's CPU backend keeps), plus the backward's largest transient (`transient_tensors`: a
  vocabulary block of the head's logits, or one recomputed layer), the gradients and the
  sampled windows. `model.remat` (cfg.remat) changes what is kept (accelerator profile).

A device holds (U / devices) x (state + tokens) of its users, padding rows included, plus the
shared bytes, plus the step working set of the users whose activations are alive at once: C of
them with train.user_chunk = C (`device_bytes`, `users_per_device`), all of them without.

`measure` compiles the real round program (compile only, with the same user_chunk at every U) and
compares its memory_analysis() with the model; `python -m comigs_jax.capacity ...
--config.measure=16,64` prints both.

Shared (replicated on every device, not per user): the frozen base in float32, its copy in the
activation dtype (XLA converts each frozen kernel once per step and keeps it for the backward),
and the transposed embedding of the tied LM head.

FLOP convention: a matmul [m, k] x [k, n] is 2mkn FLOPs; elementwise ops, softmax, LayerNorm and
the optimizer are not counted. Forward: every matmul. Backward: the
input gradient of every matmul that lies between a trainable leaf and the loss (frozen matmuls
included: that is how the gradient reaches the adapters below them), and weight gradients of
the trainable leaves only (none for frozen kernels). For a frozen model with LoRA adapters the
training step is therefore about 2x its forward, not the 3x of full fine-tuning.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Optional

from comigs_jax.federated.methods import Method, configure_model
from comigs_jax.federated.users import device_chunk, padded_user_count
from comigs_jax.model.config import REMAT, GPT2Config, LlamaConfig
from comigs_jax.model.lm import ModelConfig, family_of
from comigs_jax.train.state import TrainConfig

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Target:
    """One accelerator chip: its memory and its dense bf16 peak (vendor data sheets)."""

    name: str
    memory_bytes: float
    peak_bf16_flops: float
    note: str = ""


# Peaks are the dense (no sparsity) bf16 matmul numbers of the data sheets; GPU memory is what
# nvidia-smi reports for the card (81,559 MiB on an H100 80GB HBM3, 143,771 MiB on an H200).
MiB = 2**20
TARGETS = {
    "h100": Target("NVIDIA H100 SXM 80 GB", 81559 * MiB, 989e12, "81,559 MiB HBM3; 989 TFLOP/s dense bf16"),
    "h200": Target("NVIDIA H200 141 GB", 143771 * MiB, 989e12, "143,771 MiB HBM3e; same tensor cores as H100"),
    "tpu-v4": Target("TPU v4 (per chip)", 32 * GiB, 275e12, "32 GiB HBM2 per chip; 275 TFLOP/s bf16"),
    "tpu-v5e": Target("TPU v5e (per chip)", 16 * GiB, 197e12, "16 GiB HBM2 per chip; 197 TFLOP/s bf16"),
}

# Fraction of a chip's memory the plan lets the round program use: the rest for the runtime,
# XLA's fragmentation and evaluation. (JAX on GPU preallocates 75% by default: set
# XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 to get this much.)
USABLE_FRACTION = 0.9
# Assumed model FLOP utilisation for the time estimates (experiments.bench measures it).
MFU = 0.35


def _itemsize(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2}[dtype]


# ----------------------------------------------------------------------------- parameters

@dataclasses.dataclass(frozen=True)
class Shapes:
    """The matmul and parameter shapes of a model config, per family (`shapes(cfg)`): everything
    param_counts, shared_bytes and step_flops read, so that they are one count for every family.

    attn: the attention's projections (name, d_in, d_out), each a frozen kernel (+ bias) with a LoRA
      when cfg.attn_lora; the last is the output projection, the others read the block input.
    mlp: the frozen MLP's matmuls (name, d_in, d_out); every expert has a LoRA on each.
    width: the attention's inner width H * head_dim (Q K^T and P V run over all H query heads).
    hidden: the MLP's hidden width F. norm: parameters of one norm (LayerNorm 2d, RMSNorm d).
    positions: rows of a position table (GPT-2's wpe; 0: RoPE). head: the LM head's name in the
    plan's shared bytes; untied_head: a separate lm_head kernel [d, V] beside the embedding.
    """

    family: str
    d: int
    n_layer: int
    vocab: int
    attn: tuple
    mlp: tuple
    width: int
    n_head: int
    hidden: int
    bias: bool
    norm: int
    positions: int
    untied_head: bool
    head: str


def shapes(cfg: ModelConfig) -> Shapes:
    """The Shapes of a GPT2Config or a LlamaConfig (dispatch on cfg.family)."""
    family = family_of(cfg)
    d, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    if family == "gpt2":
        f = 4 * d
        return Shapes("gpt2", d, L, V, attn=(("c_attn", d, 3 * d), ("c_proj", d, d)),
                      mlp=(("c_fc", d, f), ("c_proj", f, d)), width=d, n_head=cfg.n_head, hidden=f, bias=True,
                      norm=2 * d, positions=cfg.n_positions, untied_head=False, head="wte_transposed")
    q, kv, f = cfg.n_head * cfg.dim_head, cfg.n_kv_head * cfg.dim_head, cfg.intermediate_size
    untied = not cfg.tie_word_embeddings
    return Shapes("llama", d, L, V, attn=(("q_proj", d, q), ("k_proj", d, kv), ("v_proj", d, kv), ("o_proj", q, d)),
                  mlp=(("gate_proj", d, f), ("up_proj", d, f), ("down_proj", f, d)), width=q, n_head=cfg.n_head,
                  hidden=f, bias=False, norm=d, positions=0, untied_head=untied,
                  head="lm_head_transposed" if untied else "embed_transposed")


def param_counts(cfg: ModelConfig) -> dict:
    """Parameters by role (method.md §1.7), from the shapes: base, attn, generalist,
    specialist, router; `expert_each` is one expert's LoRA factors."""
    s = shapes(cfg)
    d, L, V = s.d, s.n_layer, s.vocab
    dense = lambda mats: sum(i * o + (o if s.bias else 0) for _, i, o in mats)
    lora = lambda mats, r: sum(r * (i + o) for _, i, o in mats)
    # embedding, position table, final norm, untied head; per layer two norms, attention and MLP
    base = V * d + s.positions * d + s.norm + (V * d if s.untied_head else 0)
    base += L * (2 * s.norm + dense(s.attn) + dense(s.mlp))
    out = {"base": base, "attn": 0, "generalist": 0, "specialist": 0, "router": 0, "expert_each": 0}
    if cfg.attn_lora is not None:
        out["attn"] = L * lora(s.attn, cfg.attn_lora.rank)
    if cfg.moe is not None:
        moe = cfg.moe
        each = lora(s.mlp, moe.lora.rank)
        out["expert_each"] = L * each
        out["generalist"] = L * each * moe.n_generalists
        out["specialist"] = L * each * moe.n_specialists
        out["router"] = {"learned": L * d * moe.n_experts, "user": L * moe.n_experts}.get(moe.router, 0)
    out["trainable"] = out["attn"] + out["generalist"] + out["specialist"] + out["router"]
    return out


def state_bytes(cfg: ModelConfig, tc: TrainConfig, method: Method) -> dict:
    """Bytes of one user's UserState (params, both AdamW states, counters, key, leaks)."""
    p = param_counts(cfg)
    joint = method.router_mode == "joint"
    expert_p = p["attn"] + p["generalist"] + p["specialist"] + (p["router"] if joint else 0)
    router_p = p["router"] if method.alternating else 0
    counters = 2 * 4  # int32: Adam's count and the cosine schedule's count (the router's lr is constant: one)
    out = {
        "params": 4 * p["trainable"],
        "opt_expert": 2 * 4 * expert_p + counters,  # mu, nu float32
        "opt_router": (2 * 4 * router_p + 4) if method.alternating else 0,
        "step_and_key": 4 + 8,
        "leak": 4 * p["trainable"] if (tc.faithful and method.alternating) else 0,
    }
    out["total"] = sum(out.values())
    return out


# ----------------------------------------------------------------------------- activations

PROFILES = ("cpu", "accelerator")
# XLA's CPU backend keeps four of the six [E, N, 4d] terms JAX saves for every expert's tanh-GELU
# (it recomputes the cheapest in the backward fusions): fitted to the compiled tiny round at seven
# shapes (docs/scaling.md); JAX's own residual list (print_saved_residuals) has six.
CPU_GELU_TERMS = 4
# Llama's SwiGLU experts: JAX saves five [E, N, F] per layer without jax.checkpoint (the gate and
# up pre-activations, sigmoid(gate), silu(gate) and the product a); XLA's CPU fusions keep
# CPU_SWIGLU_TERMS of them, fitted to the compiled tiny Llama round (docs/scaling.md).
CPU_SWIGLU_TERMS = 5


def head_block_of(cfg: ModelConfig) -> int:
    """Vocabulary columns the loss's head computes at once: cfg.head_block capped at V (0: the
    full [N, V] logits, the model without a blocked cross-entropy)."""
    return min(cfg.head_block, cfg.vocab_size)


def _scores_tensors(batch: int, heads: int, seq_len: int, profile: str, a: int) -> list[tuple[str, int, int]]:
    """What the backward keeps of jax.nn.dot_product_attention's softmax(Q K^T) over all query heads
    (grouped-query or not): [B, H, T, T] tensors, one layer."""
    bhtt = batch * heads * seq_len * seq_len
    if profile == "cpu":
        return [("attn masked scores, exp(scores) [B,H,T,T] (f32)", 2 * bhtt, 4),
                ("attn causal mask [B,H,T,T] (bool)", bhtt, 1),
                ("attn softmax statistics [B,H,T] (f32)", 2 * batch * heads * seq_len, 4),
                ("attn probabilities [B,H,T,T]", bhtt, 4 if a == 4 else a)]
    return [("attn probabilities [B,H,T,T] (f32)", bhtt, 4), ("attn probabilities cast [B,H,T,T]", bhtt, a)]


def _cpu_gate_tensors(n: int, moe) -> list[tuple[str, int, int]]:
    """The router's and the load balancing's float32 tensors of one layer, as JAX saves them."""
    e, k = moe.n_experts, moe.top_k
    return [("gate: logits, top-k, softmax, one-hot, load balancing (f32)", 5 * n * e + n * k + n * k * e + 4 * n, 4)]


def _gpt2_layer(cfg: GPT2Config, batch: int, seq_len: int, profile: str, remat: str) -> list[tuple[str, int, int]]:
    """What the backward keeps of one GPT-2 block of one user (names without the layer prefix)."""
    a = _itemsize(cfg.dtype)
    d, H = cfg.n_embd, cfg.n_head
    n, f = batch * seq_len, 4 * cfg.n_embd
    scores = _scores_tensors(batch, H, seq_len, profile, a)
    t = []
    if profile == "cpu":
        # flax LayerNorm: x - mean, x^2 and the normalised x in float32, and per-token statistics;
        # ln_1's output (the attention's and its LoRA's input) is kept too.
        per_ln = [("ln (x - mean, x^2, normalised) (f32)", 3 * n * d, 4), ("ln statistics [N] (f32)", 4 * n, 4)]
        t += [("ln_1 " + nm, e, b) for nm, e, b in per_ln] + [("ln_1 output", n * d, a)]
        if cfg.attn_lora is not None:
            t += [("attn x@A (c_attn, c_proj)", 2 * n * cfg.attn_lora.rank, a)]
        t += [("attn q, k, v", 3 * n * d, a), *scores[:3], ("attn output y (c_proj input)", n * d, a), scores[3]]
        t += [("ln_2 " + nm, e, b) for nm, e, b in per_ln]
        if cfg.moe is None:
            return t + [("mlp c_fc output, gelu terms [N,4d]", 6 * n * f, a)]
        e, r = cfg.moe.n_experts, cfg.moe.lora.rank
        t += [*_cpu_gate_tensors(n, cfg.moe),
              ("moe input h [N,d], weights [N,E]", n * d + n * e, a),
              ("moe h@A [N,E*r]", n * e * r, a),
              (f"moe expert gelu terms {CPU_GELU_TERMS} x [E,N,4d]", CPU_GELU_TERMS * e * n * f, a),
              ("moe mixed [N,4d] (frozen c_proj input)", n * f, a),
              ("moe g@A [E,N,r], its weighted [N,E*r]", 2 * e * n * r + e * n, a),
              ("moe LoRA factors concatenated over experts", 2 * e * r * f + 2 * d * e * r, a)]
        return t
    # accelerator: XLA's GPU fusion (docs/scaling.md)
    t += [("ln_1, ln_2 inputs and outputs [N,d]", 4 * n * d, a),
          ("ln statistics [N] (f32)", 4 * n, 4),
          ("attn qkv [N,3d] and its head-major copy", 2 * 3 * n * d, a),
          *scores,
          ("attn output y (c_proj input)", n * d, a)]
    if cfg.attn_lora is not None:
        t += [("attn x@A (c_attn, c_proj)", 2 * n * cfg.attn_lora.rank, a)]
    if cfg.moe is None:
        return t + [("mlp c_fc output and gelu output [N,4d]", 2 * n * f, a)]
    e, r = cfg.moe.n_experts, cfg.moe.lora.rank
    if remat == "moe":  # the expert core is recomputed from u: no [E, N, 4d] kept
        t += [("moe frozen c_fc output u and mixed [N,4d]", 2 * n * f, a)]
    else:  # the lean expert MLP: only the pre-activation of every expert
        t += [("moe mixed [N,4d]", n * f, a),
              ("moe expert pre-activation [E,N,4d]", e * n * f, a)]
    t += [("moe h@A, g@A, weights", n * e * r + e * n * r + n * e, a),
          ("gate: logits, top-k, softmax, load balancing [N,E] (f32)", 12 * n * e, 4)]
    return t


def _llama_layer(cfg: LlamaConfig, batch: int, seq_len: int, profile: str, remat: str) -> list[tuple[str, int, int]]:
    """What the backward keeps of one Llama block of one user (names without the layer prefix):
    two RMSNorms (float32 math, output in the activation dtype), q/k/v and their RoPE rotation,
    grouped-query attention (the scores of all H query heads), the SwiGLU mixture of experts."""
    a = _itemsize(cfg.dtype)
    d, hd = cfg.n_embd, cfg.dim_head
    n, f = batch * seq_len, cfg.intermediate_size
    qkv = n * (cfg.n_head + 2 * cfg.n_kv_head) * hd                      # q [N, H hd], k, v [N, KV hd]
    scores = _scores_tensors(batch, cfg.n_head, seq_len, profile, a)
    lora = [("attn x@A (q, k, v, o_proj)", 4 * n * cfg.attn_lora.rank, a)] if cfg.attn_lora is not None else []
    if profile == "cpu":
        # RMSNorm: its float32 input and 1/rms [N] (the scale is frozen: no normalised copy), its
        # output in the activation dtype (the next matmuls' and their LoRA's input).
        t = [("input_layernorm, post_attention_layernorm inputs (f32)", 2 * n * d, 4),
             ("rms statistics [N] (f32)", 4 * n, 4),
             ("input_layernorm, post_attention_layernorm outputs [N,d]", 2 * n * d, a),
             *lora, ("attn q, k, v after RoPE", qkv, a), *scores,
             ("attn output y (o_proj input)", n * cfg.n_head * hd, a)]
        if cfg.moe is None:  # gate, up, sigmoid(gate), silu(gate), the product
            return t + [("mlp gate, up outputs, silu terms [N,F]", 5 * n * f, a)]
        e, r = cfg.moe.n_experts, cfg.moe.lora.rank
        # XLA:CPU keeps the frozen gate and up outputs (the checkpointed core's inputs) too: fitted,
        # with CPU_SWIGLU_TERMS, to the compiled tiny Llama round at seven shapes (docs/scaling.md).
        return t + [*_cpu_gate_tensors(n, cfg.moe),
                    ("moe frozen gate, up outputs g, u [N,F]", 2 * n * f, a),
                    ("moe weights [N,E]", n * e, a),
                    ("moe h@A (gate, up) [N,2*E*r]", 2 * n * e * r, a),
                    (f"moe expert SwiGLU terms {CPU_SWIGLU_TERMS} x [E,N,F]", CPU_SWIGLU_TERMS * e * n * f, a),
                    ("moe a@A [E,N,r], its weighted [N,E*r]", 2 * e * n * r + e * n, a),
                    ("moe LoRA factors concatenated over experts", 3 * e * r * f + 3 * d * e * r, a)]
    # accelerator: GPT-2's buffer assignment on an H100 carried over to Llama's tensors (not read
    # on a GPU): norms keep their inputs and outputs, q/k/v kept before and after RoPE (the head-major
    # copy), the lean SwiGLU core keeps its two pre-activations (both named "moe_pre").
    t = [("input_layernorm, post_attention_layernorm inputs and outputs [N,d]", 4 * n * d, a),
         ("rms statistics [N] (f32)", 2 * n, 4),
         ("attn q, k, v [N,(H+2KV)hd] and after RoPE", 2 * qkv, a),
         *scores,
         ("attn output y (o_proj input)", n * cfg.n_head * hd, a), *lora]
    if cfg.moe is None:
        return t + [("mlp gate, up outputs and their product [N,F]", 3 * n * f, a)]
    e, r = cfg.moe.n_experts, cfg.moe.lora.rank
    if remat == "moe":  # the core is recomputed from the frozen gate and up outputs: no [E, N, F] kept
        t += [("moe frozen gate, up outputs g, u and mixed [N,F]", 3 * n * f, a)]
    else:
        t += [("moe mixed [N,F]", n * f, a),
              ("moe expert gate and up pre-activations 2 x [E,N,F]", 2 * e * n * f, a)]
    return t + [("moe h@A (gate, up), a@A, weights", 2 * n * e * r + e * n * r + n * e, a),
                ("gate: logits, top-k, softmax, load balancing [N,E] (f32)", 12 * n * e, 4)]


def _layer_tensors(cfg: ModelConfig, batch: int, seq_len: int, profile: str, remat: str, l: int
                   ) -> list[tuple[str, int, int]]:
    """What the backward keeps of one transformer block (layer l) of one user."""
    layer = _gpt2_layer if shapes(cfg).family == "gpt2" else _llama_layer
    return [(f"L{l}." + name, e, b) for name, e, b in layer(cfg, batch, seq_len, profile, remat)]


def _head_tensors(cfg: ModelConfig, batch: int, seq_len: int, profile: str) -> list[tuple[str, int, int]]:
    a = _itemsize(cfg.dtype)
    n, d, V = batch * seq_len, cfg.n_embd, cfg.vocab_size
    gpt2 = shapes(cfg).family == "gpt2"
    if profile == "cpu" and gpt2:
        t = [("head ln_f (x - mean, x^2, normalised) (f32)", 3 * n * d, 4), ("head ln_f statistics (f32)", 4 * n, 4),
             ("head ln_f output [N,d]", n * d, a)]
    elif profile == "cpu":
        t = [("head norm input (f32)", n * d, 4), ("head norm statistics (f32)", 2 * n, 4), ("head norm output [N,d]", n * d, a)]
    else:
        t = [(f"head {'ln_f' if gpt2 else 'norm'} input and output [N,d]", 2 * n * d, a)]
    if head_block_of(cfg):  # blocked cross-entropy: d ce / d x [N, d], log-sum-exp [N]
        return t + [("head d ce/dx [N,d] (blocked cross-entropy)", n * d, a), ("head log-sum-exp, label logit [N] (f32)", 2 * n, 4)]
    return t + [("head exp(logits) [N,V] (f32)", n * V, 4)]


def activation_tensors(cfg: ModelConfig, batch: int, seq_len: int, profile: str = "accelerator"
                       ) -> list[tuple[str, int, int]]:
    """What the backward pass of one expert step keeps, per user: (name, elements, bytes each).

    profile "cpu": what XLA's CPU backend keeps: JAX's saved residuals of the loss without any
    jax.checkpoint (XLA:CPU merges a checkpoint's recomputation back into the forward, so
    `model.remat` and the lean expert MLP do not change its memory: jax-ml/jax#19822, measured in
    docs/scaling.md), with CPU_GELU_TERMS of the tanh-GELU's six [E, N, 4d] terms (GPT-2) or
    CPU_SWIGLU_TERMS of SwiGLU's five [E, N, F] (Llama). Profile "accelerator": what XLA's GPU
    backend keeps after fusion (its buffer assignment for GPT-2 on an H100, docs/scaling.md; carried
    over to Llama's tensors) for the lean expert MLP (one [E, N, 4d] per layer for GPT-2, the gate
    and up pre-activations for Llama) and `model.remat`: "moe" keeps no [E, N, F], "block" keeps
    only each block's input (one block is recomputed at a time in the backward:
    `transient_tensors`). N = batch x seq_len tokens, a = the activation dtype's bytes. Without a
    blocked cross-entropy (cfg.head_block 0) the head keeps exp(logits).
    """
    if profile not in PROFILES:
        raise ValueError(f"profile={profile!r}: allowed {PROFILES}")
    remat = cfg.remat if profile == "accelerator" else "none"
    if remat == "block":
        t = [(f"L{l}.block input [N,d]", batch * seq_len * cfg.n_embd, _itemsize(cfg.dtype)) for l in range(cfg.n_layer)]
    else:
        t = [x for l in range(cfg.n_layer) for x in _layer_tensors(cfg, batch, seq_len, profile, remat, l)]
    return t + _head_tensors(cfg, batch, seq_len, profile)


def transient_tensors(cfg: ModelConfig, batch: int, seq_len: int, profile: str = "accelerator"
                      ) -> list[tuple[str, int, int]]:
    """The backward's largest working set beyond the kept activations, per user: the head's (the
    blocked cross-entropy's [N, block] float32 logits and probabilities, or the full d logits), or
    one layer's (its activation's derivative: GPT-2's GELU, Llama's SwiGLU gate and up gradients;
    with remat "block" that block's recomputed activations, with "moe" its recomputed expert
    tensors), whichever is larger."""
    a = _itemsize(cfg.dtype)
    s = shapes(cfg)
    n, f, V = batch * seq_len, s.hidden, cfg.vocab_size
    block = head_block_of(cfg)
    if block:
        head = [("head logits and probabilities of one vocabulary block [N,block] (f32)", 2 * n * block, 4)]
    elif profile == "cpu":
        head = [("head d logits [N,V] (f32)", n * V, 4)] + ([("head d logits cast [N,V]", n * V, a)] if a != 4 else [])
    else:
        head = [("head d logits [N,V]", n * V, a)]
    if profile == "cpu" or cfg.moe is None:
        return head
    remat, e = cfg.remat, cfg.moe.n_experts
    recompute = 2 if remat == "moe" else 1  # with "moe" the core's forward is recomputed too
    if s.family == "gpt2":
        layer = [("one layer: expert GELU backward [E,N,4d]", recompute * e * n * f, a)]
    else:
        layer = [("one layer: expert SwiGLU backward, d gate and d up [E,N,F]", recompute * 2 * e * n * f, a)]
    if remat == "block":
        layer += [("one layer: " + nm.split(".", 1)[1], el, b)
                  for nm, el, b in _layer_tensors(cfg, batch, seq_len, profile, "none", cfg.n_layer - 1)]
    total = lambda ts: sum(el * b for _, el, b in ts)
    return head if total(head) >= total(layer) else layer


def step_bytes(cfg: ModelConfig, tc: TrainConfig, method: Method, profile: str = "accelerator") -> dict:
    """Working set of one training step of one user: kept activations + the backward's largest
    transient + gradients + the sampled windows."""
    kept = sum(e * b for _, e, b in activation_tensors(cfg, tc.batch_size, tc.seq_len, profile))
    transient = sum(e * b for _, e, b in transient_tensors(cfg, tc.batch_size, tc.seq_len, profile))
    p = param_counts(cfg)
    out = {"activations_kept": kept, "backward_transient": transient, "gradients": 4 * p["trainable"],
           "windows": 4 * tc.batch_size * (tc.seq_len + 1)}
    out["total"] = sum(out.values())
    return out


def shared_bytes(cfg: ModelConfig) -> dict:
    """Replicated bytes (no user axis): the frozen base and what XLA derives from it: its frozen
    kernels in the activation dtype, and the LM head as [V, d] in the activation dtype (the tied
    embedding, or an untied Llama's lm_head kernel transposed; comigs_jax.model.lm.head_matrix)."""
    s = shapes(cfg)
    p = param_counts(cfg)["base"]
    a = _itemsize(cfg.dtype)
    tables = (s.vocab * (2 if s.untied_head else 1) + s.positions) * s.d  # embedding, wpe, untied head
    out = {"base_f32": 4 * p,
           "base_cast": a * (p - tables) if a != 4 else 0,   # frozen kernels in the activation dtype
           s.head: (4 if a == 4 else a) * s.vocab * s.d}     # the head's [V, d]
    out["total"] = sum(out.values())
    return out


# ----------------------------------------------------------------------------- FLOPs

def step_flops(cfg: ModelConfig, batch: int, seq_len: int) -> dict:
    """Matmul FLOPs of one user's expert step and router step (module docstring's convention),
    from `shapes(cfg)`: the same count for GPT-2 (c_attn, c_proj, c_fc, c_proj) and Llama (q, k, v,
    o, gate, up, down; attention scores over all H query heads, grouped-query or not)."""
    s = shapes(cfg)
    L, T, n = s.n_layer, seq_len, batch * seq_len
    mm = lambda m, k, nn: 2 * m * k * nn
    fwd = {"frozen": 0, "lora": 0, "attention": 0, "router": 0, "moe_mix": 0, "head": 0}
    fwd["frozen"] = L * sum(mm(n, i, o) for _, i, o in s.attn + s.mlp)
    fwd["attention"] = L * 2 * mm(batch * T, s.width, T)  # Q K^T and P V over all heads (full T x T)
    if cfg.attn_lora is not None:
        r = cfg.attn_lora.rank
        fwd["lora"] += L * sum(mm(n, i, r) + mm(n, r, o) for _, i, o in s.attn)
    if cfg.moe is not None:
        e, r = cfg.moe.n_experts, cfg.moe.lora.rank
        # every expert's x A and (x A) B on each MLP matmul (batched over experts, or concatenated)
        fwd["lora"] += L * e * sum(mm(n, i, r) + mm(n, r, o) for _, i, o in s.mlp)
        fwd["moe_mix"] = L * mm(n, e, s.hidden)  # sum_e w_e g_e
        if cfg.moe.router == "learned":
            fwd["router"] = L * 2 * mm(n, s.d, e)  # router logits + the load balancing's block-output logits
    fwd["head"] = mm(n, s.d, s.vocab)
    forward = sum(fwd.values())
    # Layer 0's frozen projections of the block input (c_attn; q, k, v) read the (frozen)
    # embeddings: no input gradient needed there.
    first = sum(mm(n, i, o) for _, i, o in s.attn[:-1])
    input_grads = forward - first  # every matmul on the gradient path, once
    both = fwd["attention"] + fwd["moe_mix"]  # products of two activations: both operands get gradients
    expert = forward + input_grads + both + fwd["lora"]  # + the LoRA factors' weight gradients
    # Router step: the same forward and backward, with the routers' weight gradients in place
    # of the LoRA ones (XLA drops the unused LoRA weight gradients).
    router = forward + input_grads + both + fwd["router"]
    return {"forward": forward, "forward_parts": fwd, "expert_step": expert, "router_step": router}


def round_flops(cfg: ModelConfig, tc: TrainConfig, method: Method, steps: Optional[int] = None) -> dict:
    """One user's FLOPs in one round: `steps` expert steps plus the round's share of router
    phases (steps / router_every phases of router_steps steps, on average over rounds)."""
    steps = tc.local_steps if steps is None else steps
    s = step_flops(cfg, tc.batch_size, tc.seq_len)
    router_steps = steps / tc.router_every * tc.router_steps if (method.alternating and tc.router_steps) else 0.0
    return {**s, "expert_steps": steps, "router_steps": router_steps,
            "per_user": steps * s["expert_step"] + router_steps * s["router_step"]}


# ----------------------------------------------------------------------------- plan

def device_rows(n_users: int, devices: int = 1, chunk: int = 0) -> dict:
    """How a device holds its users, as comigs_jax.federated.layout.Layout lays them out: `rows`
    (its users padded to whole chunks), the effective `chunk` (0: all at once, also when the chunk
    is at least a device's users) and `live`, the users whose activations are alive at once."""
    c = device_chunk(n_users, devices, chunk)
    rows = padded_user_count(n_users, devices * max(c, 1)) // devices
    return {"users": -(-n_users // devices), "rows": rows, "chunk": c, "live": c or rows}


def device_bytes(per_user: dict, shared: int, n_users: int, devices: int = 1, chunk: int = 0) -> dict:
    """Resident bytes of one device for `n_users` users over `devices` devices with train.user_chunk
    `chunk`: (U / devices) x (state + tokens), padding rows included, + the shared base + the
    activations (one step's working set) of the users alive at once (C, or every user when
    unchunked). `per_user`: plan()'s {"state", "tokens", "step"}."""
    r = device_rows(n_users, devices, chunk)
    out = {"state": r["rows"] * per_user["state"], "tokens": r["rows"] * per_user["tokens"],
           "activations": r["live"] * per_user["step"], "shared": shared}
    out["total"] = sum(out.values())
    return {**r, "bytes": out}


def users_per_device(room: float, per_user: dict, chunk: int = 0) -> int:
    """The most users one device holds in `room` bytes (its memory less the shared bytes): every
    user's state and tokens, and the activations of min(users, chunk) of them at once (every user's
    when chunk is 0)."""
    resident, step = per_user["state"] + per_user["tokens"], per_user["step"]
    at_once = max(int(room // (resident + step)), 0)
    if not chunk or room < chunk * step:
        return at_once
    chunked = int((room - chunk * step) // resident) // chunk * chunk  # whole chunks, no padding
    return max(min(at_once, chunk), chunked)


def plan(model_cfg: ModelConfig, tc: TrainConfig, method: Method, n_users: int, *,
         train_tokens: int = 1_000_000, valid_tokens: int = 100_000, token_bytes: Optional[int] = None,
         targets: Optional[list[str]] = None, mfu: float = MFU, usable_fraction: float = USABLE_FRACTION,
         profile: str = "accelerator", user_chunk: int = 0) -> dict:
    """The capacity plan of `n_users` users of this config: bytes per user (broken down),
    shared bytes, FLOPs per round, and per target chip the users per device, the devices
    needed and an estimated time per round at `mfu`. `user_chunk` (train.user_chunk): a device
    runs its users that many at a time, so it holds every user's state but only a chunk's
    activations; model_cfg.remat says which activations the backward keeps."""
    cfg = configure_model(model_cfg, method) if model_cfg.moe is not None else model_cfg
    token_bytes = token_bytes or (2 if cfg.vocab_size <= 2**16 else 4)
    st, sp, sh = state_bytes(cfg, tc, method), step_bytes(cfg, tc, method, profile), shared_bytes(cfg)
    tokens = token_bytes * (train_tokens + valid_tokens) + 2 * 4  # + the two lengths
    per_user = {"state": st["total"], "tokens": tokens, "step": sp["total"]}
    per_user["total"] = sum(per_user.values())
    fl = round_flops(cfg, tc, method)
    rows = []
    for key in targets or list(TARGETS):
        t = TARGETS[key]
        room = t.memory_bytes * usable_fraction - sh["total"]
        upd = users_per_device(room, per_user, user_chunk)
        devices = math.ceil(n_users / upd) if upd else None
        if devices:
            per_device = math.ceil(n_users / devices)  # users padded to a multiple of the device count
            sec = per_device * fl["per_user"] / (t.peak_bf16_flops * mfu)
        else:
            per_device, sec = 0, None
        rows.append({"target": key, "name": t.name, "memory_bytes": t.memory_bytes, "peak_flops": t.peak_bf16_flops,
                     "users_per_device": upd, "devices": devices, "users_on_busiest_device": per_device,
                     "round_seconds": sec, "note": t.note})
    return {
        "config": {"n_users": n_users, "family": shapes(cfg).family, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "vocab_size": cfg.vocab_size,
                   "dtype": cfg.dtype, "batch_size": tc.batch_size, "seq_len": tc.seq_len,
                   "local_steps": tc.local_steps, "router_every": tc.router_every, "router_steps": tc.router_steps,
                   "method": method.name, "n_experts": cfg.moe.n_experts if cfg.moe else 0,
                   "n_generalists": cfg.moe.n_generalists if cfg.moe else 0,
                   "train_tokens": train_tokens, "valid_tokens": valid_tokens, "token_bytes": token_bytes,
                   "mfu": mfu, "usable_fraction": usable_fraction, "profile": profile,
                   "user_chunk": user_chunk, "remat": cfg.remat, "head_block": head_block_of(cfg)},
        "params": param_counts(cfg),
        "state": st, "step": sp, "shared": sh, "per_user": per_user,
        "profile": profile,
        "activations": activation_tensors(cfg, tc.batch_size, tc.seq_len, profile),
        "transient": transient_tensors(cfg, tc.batch_size, tc.seq_len, profile),
        "flops": fl, "flops_round_all_users": n_users * fl["per_user"],
        "targets": rows,
    }


def _b(x: float) -> str:
    for unit, s in ((GiB, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(x) >= unit:
            return f"{x / unit:,.2f} {s}"
    return f"{x:,.0f} B"


def _group_activations(tensors) -> dict:
    """Kept activations summed by kind over layers (name without the layer prefix)."""
    out = {}
    for name, e, b in tensors:
        key = name.split(".", 1)[1] if name.startswith("L") and "." in name else name
        out[key] = out.get(key, 0) + e * b
    return out


def format_plan(p: dict) -> str:
    c, pc = p["config"], p["params"]
    family = {"gpt2": "GPT-2", "llama": "Llama"}[c["family"]]
    lines = [f"# Capacity plan: {c['n_users']:,} users, {family} {c['n_layer']}L x {c['n_embd']} (V {c['vocab_size']:,}), "
             f"{c['method']} ({c['n_generalists']}G + {c['n_experts'] - c['n_generalists']}S), "
             f"batch {c['batch_size']} x {c['seq_len']}, {c['dtype']}, remat {c['remat']!r}, "
             f"user_chunk {c['user_chunk']}, activation profile {c['profile']!r}", ""]
    lines.append("Trainable parameters per user: " + ", ".join(
        f"{k} {pc[k]:,}" for k in ("attn", "generalist", "specialist", "router", "trainable")) + f"; base {pc['base']:,}")
    lines += ["", "| Per user | Bytes |", "|---|---|"]
    for k, v in p["state"].items():
        if k != "total":
            lines.append(f"| state: {k} | {_b(v)} |")
    lines.append(f"| tokens ({c['train_tokens']:,} + {c['valid_tokens']:,} x {c['token_bytes']} B) | {_b(p['per_user']['tokens'])} |")
    for k, v in p["step"].items():
        if k != "total":
            lines.append(f"| step: {k} | {_b(v)} |")
    lines.append(f"| **total per user** (state + tokens + one step's working set) | **{_b(p['per_user']['total'])}** |")
    lines.append("| shared (replicated per device): " + ", ".join(f"{k} {_b(v)}" for k, v in p["shared"].items()
                                                                     if k != "total") + f" | {_b(p['shared']['total'])} |")
    if c["user_chunk"]:
        pu = p["per_user"]
        lines += ["", f"With train.user_chunk = {c['user_chunk']}, a device holds every user's state and tokens "
                      f"({_b(pu['state'] + pu['tokens'])} per user) but the working set of only {c['user_chunk']} users "
                      f"at once ({_b(c['user_chunk'] * pu['step'])})."]
    lines += ["", "Kept activations of one step, by kind (all layers):", "", "| Tensor | Bytes |", "|---|---|"]
    for k, v in sorted(_group_activations(p["activations"]).items(), key=lambda kv: -kv[1])[:10]:
        lines.append(f"| {k} | {_b(v)} |")
    lines += ["", "Largest transient of the backward: " + ", ".join(f"{k} {_b(v)}" for k, v in
                                                                 _group_activations(p["transient"]).items()) + "."]
    fl = p["flops"]
    lines += ["", f"FLOPs per user: expert step {fl['expert_step'] / 1e12:,.3f} TFLOP (forward {fl['forward'] / 1e12:,.3f}), "
                  f"router step {fl['router_step'] / 1e12:,.3f} TFLOP; round = {fl['expert_steps']} expert + "
                  f"{fl['router_steps']:g} router steps = {fl['per_user'] / 1e12:,.2f} TFLOP per user, "
                  f"{p['flops_round_all_users'] / 1e15:,.1f} PFLOP for all users.", "",
              f"| Target | Memory | Peak bf16 | Users / device | Devices for {c['n_users']:,} | "
              f"Round time at {100 * c['mfu']:.0f}% MFU |", "|---|---|---|---|---|---|"]
    for r in p["targets"]:
        sec = "-" if r["round_seconds"] is None else f"{r['round_seconds']:,.1f} s"
        lines.append(f"| {r['name']} | {_b(r['memory_bytes'])} | {r['peak_flops'] / 1e12:,.0f} TFLOP/s | "
                     f"{r['users_per_device']} | {r['devices'] or 'does not fit'} | {sec} |")
    lines.append("")
    chunked = (f"every user's state and tokens plus the working set of {c['user_chunk']} users at once"
               if c["user_chunk"] else "the total per user of every user")
    lines.append(f"Usable memory {100 * c['usable_fraction']:.0f}% of each chip, minus the shared bytes, holds {chunked}; "
                 f"devices = ceil(users / users per device); round time = users on the busiest device x FLOPs per user / "
                 f"(peak x MFU).")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- measurement

def compiled_memory(model_cfg: ModelConfig, tc: TrainConfig, method: Method, n_users: int, *,
                    train_tokens: int, valid_tokens: int, token_dtype: str = "uint16", user_chunk: int = 0,
                    compiler_options: Optional[dict] = None) -> dict:
    """Bytes of the compiled round program `vmap_round(...)` at U = n_users on one device of the
    default backend, from XLA's memory_analysis() (compile only: nothing runs, nothing is
    allocated). The users are laid out as a run lays them out (comigs_jax.federated.layout.Layout
    with `user_chunk`, padding rows included), on a one-device mesh: what one device holds for
    n_users users, running them user_chunk at a time.

    total = arguments + outputs - aliased (the donated states) + temporaries; also `rows` (the
    padded user axis), `chunk` (the layout's effective chunk, 0 = all at once) and `compile_s`."""
    import time

    import jax
    import jax.numpy as jnp

    from comigs_jax.federated.layout import Layout
    from comigs_jax.federated.roles import split_base
    from comigs_jax.federated.sharding import single_device_mesh
    from comigs_jax.model.lm import param_shapes
    from comigs_jax.train.rounds import vmap_round
    from comigs_jax.train.state import init_states

    cfg = configure_model(model_cfg, method)
    layout = Layout(n_users, single_device_mesh(), chunk=user_chunk)
    n, users, rep = layout.n_rows, layout.users, layout.replicated
    S = lambda shape, dtype, sharding=users: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    place = lambda tree, sharding: jax.tree.map(lambda x: S(x.shape, x.dtype, sharding), tree)
    base = place(split_base(param_shapes(cfg.base))[0], rep)
    n_shared = cfg.moe.n_specialists
    states = place(jax.eval_shape(lambda k: init_states(cfg, tc, method, k, n, n_shared), jax.random.key(0)), users)
    tok = jnp.dtype(token_dtype)
    data = {"train": S((n, train_tokens), tok), "train_len": S((n,), jnp.int32),
            "valid": S((n, valid_tokens), tok), "valid_len": S((n,), jnp.int32)}
    args = (base, states, data, S((n, cfg.moe.n_experts), jnp.bool_), S((n,), jnp.bool_))
    t = time.perf_counter()
    fn = vmap_round(cfg, tc, method, tc.local_steps, mesh=layout.mesh, user_chunk=layout.model_chunk)
    m = fn.lower(*args).compile(compiler_options=compiler_options).memory_analysis()
    out = {k: int(getattr(m, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                           "alias_size_in_bytes", "temp_size_in_bytes")}
    out["total"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"] - out["alias_size_in_bytes"]
                    + out["temp_size_in_bytes"])
    out.update(rows=n, chunk=layout.model_chunk, compile_s=time.perf_counter() - t)
    return out


def measure(model_cfg: ModelConfig, tc: TrainConfig, method: Method, users=(16, 64), profile: Optional[str] = None,
            user_chunk: int = 0, **kw) -> dict:
    """Compiled bytes at each U (the same `user_chunk`), the marginal bytes per row (user, padding
    included) between the smallest and largest U, and the model's bytes beside them: per U the
    device total (comigs_jax.capacity.device_bytes), the arguments (state, tokens and the base)
    and the temporaries (the activations of the users alive at once)."""
    import jax
    profile = profile or ("cpu" if jax.default_backend() == "cpu" else "accelerator")
    runs = {u: compiled_memory(model_cfg, tc, method, u, user_chunk=user_chunk, **kw) for u in users}
    lo, hi = min(users), max(users)
    p = plan(model_cfg, tc, method, hi, train_tokens=kw.get("train_tokens", 0),
             valid_tokens=kw.get("valid_tokens", 0), token_bytes=2 if kw.get("token_dtype", "uint16") == "uint16" else 4,
             profile=profile, user_chunk=user_chunk)
    pu, model_shared = p["per_user"], p["shared"]["total"]
    per_u = {}
    for u, r in runs.items():
        d = device_bytes(pu, model_shared, u, 1, user_chunk)
        b = d["bytes"]
        args = b["state"] + b["tokens"] + model_shared
        per_u[u] = {"rows": d["rows"], "live": d["live"], "measured_total": r["total"], "measured_per_user": r["total"] / u,
                    "model_total": b["total"], "ratio": b["total"] / r["total"],
                    "model_arguments": args, "arguments_ratio": args / r["argument_size_in_bytes"],
                    "model_activations": b["activations"],
                    "activations_ratio": b["activations"] / max(r["temp_size_in_bytes"], 1)}
    rows_lo, rows_hi = per_u[lo]["rows"], per_u[hi]["rows"]
    marginal = (runs[hi]["total"] - runs[lo]["total"]) / (rows_hi - rows_lo)
    model_marginal = (per_u[hi]["model_total"] - per_u[lo]["model_total"]) / (rows_hi - rows_lo)
    return {"profile": profile, "user_chunk": user_chunk, "remat": model_cfg.remat, "compiled": runs,
            "marginal_per_user": marginal, "model_per_user": model_marginal, "model_shared": model_shared,
            "model_step": pu["step"], "model_state": pu["state"], "model_tokens": pu["tokens"],
            "ratio_marginal": model_marginal / marginal, "per_u": per_u,
            # total at zero rows: the shared bytes, plus the live users' working set when chunked
            "measured_intercept": runs[lo]["total"] - rows_lo * marginal,
            "model_intercept": per_u[lo]["model_total"] - rows_lo * model_marginal}


# ----------------------------------------------------------------------------- command line

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "capacity.py")
# Where the keys of each group of configs/capacity.py are defined (unknown-key messages).
HOMES = {"": "configs/capacity.py", "model": "configs/base.py", "train": "configs/base.py"}


def _ints(s) -> list[int]:
    return [int(x) for x in str(s).replace(" ", "").split(",") if x]


def check_config(cfg) -> None:
    """The capacity keys' checks (ConfigError, one line); the model's are engine_configs'."""
    from comigs_jax.configuration import _fail
    if not (isinstance(cfg.users, int) and cfg.users >= 1):
        _fail("users", cfg.users, "a positive integer")
    unknown = [t for t in str(cfg.targets).split(",") if t.strip() and t.strip() not in TARGETS]
    if unknown or not str(cfg.targets).strip():
        _fail("targets", cfg.targets, f"comma-separated, of {', '.join(TARGETS)}")
    if cfg.profile not in PROFILES:
        _fail("profile", cfg.profile, " | ".join(PROFILES))
    if cfg.model.remat not in REMAT:
        _fail("model.remat", cfg.model.remat, " | ".join(REMAT))
    if not 0 < cfg.mfu <= 1:
        _fail("mfu", cfg.mfu, "in (0, 1]")
    if not 0 < cfg.usable <= 1:
        _fail("usable", cfg.usable, "in (0, 1]")
    for key in ("train_tokens", "valid_tokens"):
        if not (isinstance(cfg[key], int) and cfg[key] >= cfg.train.seq_len + 1):
            _fail(key, cfg[key], f"at least one window: train.seq_len + 1 = {cfg.train.seq_len + 1}")
    try:
        users = _ints(cfg.measure)
    except ValueError:
        users = [0]
    if users and (len(users) < 2 or min(users) < 1 or len(set(users)) < 2):
        _fail("measure", cfg.measure, "'' or at least two different positive U, comma-separated (e.g. 16,64)")


def run(cfg) -> dict:
    """The plan of a configs/capacity.py config (and its measurement with cfg.measure), printed."""
    from comigs_jax.configuration import engine_configs
    check_config(cfg)
    model_cfg, tc, method = engine_configs(cfg)
    chunk = cfg.train.get("user_chunk", 0)
    p = plan(model_cfg, tc, method, cfg.users, train_tokens=cfg.train_tokens, valid_tokens=cfg.valid_tokens,
             targets=[t.strip() for t in cfg.targets.split(",") if t.strip()], mfu=cfg.mfu,
             usable_fraction=cfg.usable, profile=cfg.profile, user_chunk=chunk)
    print(format_plan(p), end="")
    users = _ints(cfg.measure)
    if users:
        m = measure(model_cfg, tc, method, users, profile=cfg.profile, user_chunk=chunk, train_tokens=cfg.train_tokens,
                    valid_tokens=cfg.valid_tokens, token_dtype="uint16" if model_cfg.vocab_size <= 2**16 else "int32")
        print(format_measurement(m, users), end="")
        p["measurement"] = m
    return p


def format_measurement(m: dict, users) -> str:
    import jax
    dev = jax.devices()[0]
    chunk = m["user_chunk"]
    lines = [f"\nCompiled round program on {jax.default_backend()} ({dev.device_kind}), user_chunk {chunk}, "
             f"remat {m['remat']!r}: memory_analysis() (compile only)", "",
             "| U | rows | live | arguments (model) | outputs | aliased | temporaries (model) | total | total / U "
             "| model total | model / measured | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for u in users:
        r, q = m["compiled"][u], m["per_u"][u]
        lines.append(f"| {u} | {q['rows']} | {q['live']} | {_b(r['argument_size_in_bytes'])} ({_b(q['model_arguments'])}) | "
                     f"{_b(r['output_size_in_bytes'])} | {_b(r['alias_size_in_bytes'])} | "
                     f"{_b(r['temp_size_in_bytes'])} ({_b(q['model_activations'])}) | {_b(r['total'])} | "
                     f"{_b(q['measured_per_user'])} | {_b(q['model_total'])} | {q['ratio']:.3f} | {r['compile_s']:.1f} |")
    lines += ["", f"Model profile {m['profile']!r}: per user state {_b(m['model_state'])}, tokens {_b(m['model_tokens'])}, "
                  f"one step's working set {_b(m['model_step'])}. Marginal bytes per row: measured "
                  f"{_b(m['marginal_per_user'])}, model {_b(m['model_per_user'])} (model / measured "
                  f"{m['ratio_marginal']:.3f}); intercept (shared bytes{' + one chunk' if chunk else ''}): measured "
                  f"{_b(m['measured_intercept'])}, model {_b(m['model_intercept'])}. "
                  f"rows = users padded to whole chunks; live = users whose activations are alive at once."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """The command line `python -m comigs_jax.capacity [--config=FILE[:ARG]] [--config.key=value ...]`
    (argv[0] is the program); its exit code. Errors are one `error: ...` line on stderr."""
    from comigs_jax import cli
    argv = list(sys.argv if argv is None else argv)

    def body():
        cfg, _ = cli.parse_config(argv, DEFAULT_CONFIG, homes=HOMES, doc=__doc__)
        run(cfg)

    return cli.main_guard(body)


if __name__ == "__main__":
    from comigs_jax import cli
    cli.install_process_hooks()
    sys.exit(main())
