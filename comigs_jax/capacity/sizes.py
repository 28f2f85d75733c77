"""The parameter and matmul shapes of a model config, its parameters by role and one user's
state bytes (comigs_jax.capacity: arithmetic on the config's shapes, nothing traced)."""
from __future__ import annotations

from comigs_jax.federated.methods import Method
from comigs_jax.model.family import family_of
from comigs_jax.model.footprint import Shapes
from comigs_jax.model.lm import ModelConfig
from comigs_jax.train.state import TrainConfig

GiB = 2**30


def shapes(cfg: ModelConfig) -> Shapes:
    """The Shapes of a model config: its Family's (model/footprint.py); ValueError (one line) for a
    config of no registered family."""
    return family_of(cfg).shapes(cfg)


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
        E = moe.n_experts  # noisy_topk: Linear -> tanh -> Linear, kernels w_gate [d, E] and w_mix [E, E]
        out["router"] = {"learned": L * d * E, "user": L * E, "noisy_topk": L * (d * E + E * E)}.get(moe.router, 0)
    out["trainable"] = out["attn"] + out["generalist"] + out["specialist"] + out["router"]
    return out


def state_bytes(cfg: ModelConfig, tc: TrainConfig, method: Method) -> dict:
    """Bytes of one user's UserState (params, both AdamW states, counters, key, leaks); floats in the
    trainable leaves' dtype (float32, float64 for a float64 model)."""
    p = param_counts(cfg)
    joint = method.router_mode == "joint"
    expert_p = p["attn"] + p["generalist"] + p["specialist"] + (p["router"] if joint else 0)
    router_p = p["router"] if method.alternating else 0
    counters = 2 * 4  # int32: Adam's count and the cosine schedule's count (the router's lr is constant: one)
    w = 8 if cfg.dtype == "float64" else 4  # the trainable leaves' dtype (model/precision.py's wide), and the moments'
    out = {
        "params": w * p["trainable"],
        "opt_expert": 2 * w * expert_p + counters,  # mu, nu
        "opt_router": (2 * w * router_p + 4) if method.alternating else 0,
        "step_and_key": 4 + 8,
        "leak": w * p["trainable"] if (tc.faithful and method.alternating) else 0,
    }
    out["total"] = sum(out.values())
    return out
