"""What the backward of one training step keeps per user (two profiles: what XLA's CPU backend
keeps, what an accelerator's keeps after fusion), the backward's largest transient, one step's
working set and the shared (replicated) bytes (comigs_jax.capacity's module docstring)."""
from __future__ import annotations

from comigs_jax.capacity.sizes import _itemsize, param_counts, shapes
from comigs_jax.federated.methods import Method
from comigs_jax.model.config import GPT2Config, LlamaConfig
from comigs_jax.model.lm import ModelConfig
from comigs_jax.train.state import TrainConfig


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
