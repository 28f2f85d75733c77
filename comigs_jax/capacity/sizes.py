"""The parameter and matmul shapes of a model config, its parameters by role and one user's
state bytes (comigs_jax.capacity: arithmetic on the config's shapes, nothing traced)."""
from __future__ import annotations

import dataclasses

from comigs_jax.federated.methods import Method
from comigs_jax.model.lm import ModelConfig, family_of
from comigs_jax.train.state import TrainConfig

GiB = 2**30


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
