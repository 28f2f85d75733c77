"""Matmul FLOPs of one user's steps and round (comigs_jax.capacity's FLOP convention: a
[m, k] x [k, n] matmul is 2mkn; forward, the input gradients on the path to a trainable leaf and
the trainable leaves' weight gradients; elementwise ops and the optimizer are not counted)."""
from __future__ import annotations

from typing import Optional

from comigs_jax.capacity.sizes import shapes
from comigs_jax.federated.methods import Method
from comigs_jax.model.lm import ModelConfig
from comigs_jax.train.state import TrainConfig


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
