"""Each family's part of the capacity model (comigs_jax.capacity), as arithmetic on a config: its
matmul and parameter shapes (`Shapes`), what the backward of one of its blocks keeps per user in
either activation profile, its final norm's kept tensors and its experts' backward. The Family
records (model/family.py) point at these functions; comigs_jax.capacity sums them. Nothing here
traces or allocates.

A tensor is (name, elements, bytes each); N = batch x seq_len tokens, a = the activation dtype's
bytes. Profile "cpu": what XLA's CPU backend keeps (JAX's saved residuals, no jax.checkpoint);
"accelerator": what XLA's GPU backend keeps after fusion (docs/scaling.md).
"""
from __future__ import annotations

import dataclasses

from comigs_jax.model.config import GPT2Config, LlamaConfig

Tensors = list[tuple[str, int, int]]


def _itemsize(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2}[dtype]


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

    family: str  # the Family's name
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



def gpt2_shapes(cfg: GPT2Config) -> Shapes:
    d, L, V, f = cfg.n_embd, cfg.n_layer, cfg.vocab_size, 4 * cfg.n_embd
    return Shapes(cfg.family, d, L, V, attn=(("c_attn", d, 3 * d), ("c_proj", d, d)),
                  mlp=(("c_fc", d, f), ("c_proj", f, d)), width=d, n_head=cfg.n_head, hidden=f, bias=True,
                  norm=2 * d, positions=cfg.n_positions, untied_head=False, head="wte_transposed")


def llama_shapes(cfg: LlamaConfig) -> Shapes:
    d, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    q, kv, f = cfg.n_head * cfg.dim_head, cfg.n_kv_head * cfg.dim_head, cfg.intermediate_size
    untied = not cfg.tie_word_embeddings
    return Shapes(cfg.family, d, L, V, attn=(("q_proj", d, q), ("k_proj", d, kv), ("v_proj", d, kv), ("o_proj", q, d)),
                  mlp=(("gate_proj", d, f), ("up_proj", d, f), ("down_proj", f, d)), width=q, n_head=cfg.n_head,
                  hidden=f, bias=False, norm=d, positions=0, untied_head=untied,
                  head="lm_head_transposed" if untied else "embed_transposed")


# ----------------------------------------------------------------------------- kept activations

# XLA's CPU backend keeps four of the six [E, N, 4d] terms JAX saves for every expert's tanh-GELU
# (it recomputes the cheapest in the backward fusions): fitted to the compiled tiny round at seven
# shapes (docs/scaling.md); JAX's own residual list (print_saved_residuals) has six.
CPU_GELU_TERMS = 4
# Llama's SwiGLU experts: JAX saves five [E, N, F] per layer without jax.checkpoint (the gate and
# up pre-activations, sigmoid(gate), silu(gate) and the product a); XLA's CPU fusions keep
# CPU_SWIGLU_TERMS of them, fitted to the compiled tiny Llama round (docs/scaling.md).
CPU_SWIGLU_TERMS = 5


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


def gpt2_layer(cfg: GPT2Config, batch: int, seq_len: int, profile: str, remat: str) -> Tensors:
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


def llama_layer(cfg: LlamaConfig, batch: int, seq_len: int, profile: str, remat: str) -> Tensors:
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


# ----------------------------------------------------------------------------- head norm, expert backward

def gpt2_head_norm(n: int, d: int, profile: str, a: int) -> Tensors:
    """What the backward keeps of the final LayerNorm (ln_f) of N tokens."""
    if profile == "cpu":
        return [("head ln_f (x - mean, x^2, normalised) (f32)", 3 * n * d, 4), ("head ln_f statistics (f32)", 4 * n, 4),
                ("head ln_f output [N,d]", n * d, a)]
    return [("head ln_f input and output [N,d]", 2 * n * d, a)]


def llama_head_norm(n: int, d: int, profile: str, a: int) -> Tensors:
    """What the backward keeps of the final RMSNorm (norm) of N tokens."""
    if profile == "cpu":
        return [("head norm input (f32)", n * d, 4), ("head norm statistics (f32)", 2 * n, 4), ("head norm output [N,d]", n * d, a)]
    return [("head norm input and output [N,d]", 2 * n * d, a)]


def gpt2_expert_backward(e: int, n: int, f: int, recompute: int, a: int) -> Tensors:
    """One layer's expert activation derivative in the backward (accelerator profile): the GELU's;
    `recompute` 2 when remat "moe" recomputes the core's forward too."""
    return [("one layer: expert GELU backward [E,N,4d]", recompute * e * n * f, a)]


def llama_expert_backward(e: int, n: int, f: int, recompute: int, a: int) -> Tensors:
    """One layer's expert activation derivatives: SwiGLU's gate and up gradients."""
    return [("one layer: expert SwiGLU backward, d gate and d up [E,N,F]", recompute * 2 * e * n * f, a)]
