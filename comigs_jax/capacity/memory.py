"""What the backward of one training step keeps per user (two profiles: what XLA's CPU backend
keeps, what an accelerator's keeps after fusion), the backward's largest transient, one step's
working set and the shared (replicated) bytes (comigs_jax.capacity's module docstring)."""
from __future__ import annotations

from comigs_jax.capacity.sizes import param_counts, shapes
from comigs_jax.federated.methods import Method
from comigs_jax.model.family import family_of
from comigs_jax.model.footprint import _itemsize
from comigs_jax.model.lm import ModelConfig
from comigs_jax.train.state import TrainConfig

PROFILES = ("cpu", "accelerator")


def head_block_of(cfg: ModelConfig) -> int:
    """Vocabulary columns the loss's head computes at once: cfg.head_block capped at V (0: the
    full [N, V] logits, the model without a blocked cross-entropy)."""
    return min(cfg.head_block, cfg.vocab_size)


def _layer_tensors(cfg: ModelConfig, batch: int, seq_len: int, profile: str, remat: str, l: int
                   ) -> list[tuple[str, int, int]]:
    """What the backward keeps of one transformer block (layer l) of one user."""
    layer = family_of(cfg).layer_activations(cfg, batch, seq_len, profile, remat)
    return [(f"L{l}." + name, e, b) for name, e, b in layer]


def _head_tensors(cfg: ModelConfig, batch: int, seq_len: int, profile: str) -> list[tuple[str, int, int]]:
    a = _itemsize(cfg.dtype)
    n, d, V = batch * seq_len, cfg.n_embd, cfg.vocab_size
    t = family_of(cfg).head_norm(n, d, profile, a)
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
    layer = family_of(cfg).expert_backward(e, n, f, recompute, a)
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
