"""Hugging Face Llama checkpoints (LlamaForCausalLM safetensors directories) into comigs_jax's Llama.

HF's nn.Linear weights are [out, in]; ours are x·W kernels [in, out], so every projection (and an
untied lm_head) is transposed; the embedding [V, d] and the RMSNorm scales are not. HF's
per-layer tensors (model.layers.{i}.*) are stacked on a leading [L] axis under `layers` (the
model scans its blocks); they are checked one layer at a time, so errors name the HF tensor. Hub ids and
errors and the safetensors reader (bfloat16 included: HF's Llama checkpoints are bfloat16) are
comigs_jax.model.hf's.
"""
from __future__ import annotations

import json
import os
import re
from typing import Optional

import numpy as np

from comigs_jax.model.config import LlamaConfig, RopeScaling
from comigs_jax.model.hf import (CheckpointError, _flatten, _read_tensors, _unflatten, resolve_checkpoint_dir,
                                 write_hf_dir)

_HF_CONFIG_FIELDS = {  # ours -> HF config.json
    "vocab_size": "vocab_size", "n_positions": "max_position_embeddings", "n_embd": "hidden_size",
    "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
    "intermediate_size": "intermediate_size", "rms_norm_eps": "rms_norm_eps",
}
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_LAYER = re.compile(r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm|self_attn|mlp)\.(?:(\w+_proj)\.)?weight")


# ----------------------------------------------------------------------------- names
def _hf_to_path(name: str) -> Optional[tuple]:
    """HF tensor name -> (our parameter path, transpose?), None for buffers we do not use, or
    ("?",) for a name that is not part of a Llama."""
    if name.endswith("rotary_emb.inv_freq"):
        return None  # a buffer of old checkpoints: recomputed from the config
    if name == "model.embed_tokens.weight":
        return ("embed_tokens", "embedding"), False
    if name == "model.norm.weight":
        return ("norm", "scale"), False
    if name == "lm_head.weight":
        return ("lm_head", "kernel"), True
    m = _LAYER.fullmatch(name)
    if m is None:
        return ("?",), False
    layer, module, proj = f"layers_{m.group(1)}", m.group(2), m.group(3)
    if proj is None:
        return ((layer, module, "scale"), False) if module.endswith("layernorm") else (("?",), False)
    return (layer, module, proj, "kernel"), True


def _path_to_hf(path: tuple) -> str:
    if path[0] == "embed_tokens":
        return "model.embed_tokens.weight"
    if path[0] in ("norm", "lm_head"):
        return f"{'model.' if path[0] == 'norm' else ''}{path[0]}.weight"
    return "model.layers.{}.{}.weight".format(path[0][len("layers_"):], ".".join(path[1:-1]))


def _per_layer(expected: dict) -> dict:
    """Flat {path: shape} with the scanned `layers` leaves [L, ...] split into layers_{i} leaves."""
    out = {}
    for path, s in expected.items():
        if path[0] == "layers":
            for i in range(s.shape[0]):
                out[(f"layers_{i}",) + path[1:]] = tuple(s.shape[1:])
        else:
            out[path] = tuple(s.shape)
    return out


def _stack_layers(flat: dict, n_layer: int) -> dict:
    """layers_{i} leaves -> one `layers` leaf [L, ...] per path (the scanned model's layout)."""
    out = {p: v for p, v in flat.items() if not p[0].startswith("layers_")}
    for p in {p[1:] for p in flat if p[0].startswith("layers_")}:
        out[("layers",) + p] = np.stack([flat[(f"layers_{i}",) + p] for i in range(n_layer)])
    return out


# ----------------------------------------------------------------------------- config
def _rope_from_hf(hf: dict) -> tuple[float, Optional[RopeScaling]]:
    """(rope_theta, rope_scaling) from either config.json layout: transformers 5's
    `rope_parameters` or the older top-level `rope_theta` + `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise CheckpointError("rope_parameters per layer type: only one RoPE for every layer is supported")
    params = {**(hf.get("rope_scaling") or {}), **params}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointError("partial_rotary_factor != 1: only full-dimension RoPE is supported")
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise CheckpointError(f"rope_type={kind!r}: only 'default' and 'llama3' RoPE are supported")
    params.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    missing = [k for k in _LLAMA3_KEYS if params.get(k) is None]
    if missing:
        raise CheckpointError(f"llama3 rope scaling without {missing}")
    return theta, RopeScaling("llama3", float(params["factor"]), float(params["low_freq_factor"]),
                              float(params["high_freq_factor"]), int(params["original_max_position_embeddings"]))


def llama_config_from_hf(hf_config: dict, **overrides) -> LlamaConfig:
    """Our LlamaConfig from an HF config.json dict (adapters, dtype, ... from overrides)."""
    if hf_config.get("model_type") != "llama":
        raise CheckpointError(f"model_type={hf_config.get('model_type')!r}: only 'llama' checkpoints are supported here")
    if hf_config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"hidden_act={hf_config['hidden_act']!r}: this Llama uses SwiGLU ('silu')")
    for key in ("attention_bias", "mlp_bias"):
        if hf_config.get(key, False):
            raise CheckpointError(f"{key}=true: this Llama has no biases")
    fields = {ours: hf_config[theirs] for ours, theirs in _HF_CONFIG_FIELDS.items() if theirs in hf_config}
    fields["n_kv_head"] = hf_config.get("num_key_value_heads") or fields.get("n_head", LlamaConfig.n_head)
    head_dim = hf_config.get("head_dim") or 0
    if head_dim and "n_embd" in fields and head_dim * fields.get("n_head", 1) == fields["n_embd"]:
        head_dim = 0  # the default: keeps the config equal to one written without head_dim
    fields["head_dim"] = head_dim
    fields["rope_theta"], fields["rope_scaling"] = _rope_from_hf(hf_config)
    fields["tie_word_embeddings"] = bool(hf_config.get("tie_word_embeddings", False))  # HF Llama's default
    try:
        return LlamaConfig(**{**fields, **overrides})
    except ValueError as e:
        raise CheckpointError(f"config.json does not give a valid Llama: {e}") from None


# ----------------------------------------------------------------------------- load
def _weights_name(ckpt_dir: str) -> str:
    """The weights file to name in errors (the directory when the weights are sharded)."""
    st = os.path.join(ckpt_dir, "model.safetensors")
    return st if os.path.exists(st) else ckpt_dir


def load_llama(source: str, **config_overrides) -> tuple[LlamaConfig, dict]:
    """Load an HF Llama checkpoint (local directory or hub id) -> (config, base params).

    config_overrides (attn_lora=..., moe=..., dtype=..., remat=...) are applied to the config read
    from config.json; the params are the base's only (float32), a nested dict of numpy arrays with
    llama.py's names. A tied checkpoint's stored lm_head.weight, if any, is ignored.
    """
    from comigs_jax.model.llama import llama_param_shapes

    ckpt_dir = resolve_checkpoint_dir(source)
    cfg_file = os.path.join(ckpt_dir, "config.json")
    if not os.path.exists(cfg_file):
        raise CheckpointError(f"{ckpt_dir}: config.json is missing")
    with open(cfg_file) as f:
        try:
            cfg = llama_config_from_hf(json.load(f), **config_overrides)
        except CheckpointError as e:
            raise CheckpointError(f"{cfg_file}: {e}") from None
    tensors = _read_tensors(ckpt_dir)
    where = _weights_name(ckpt_dir)
    expected = _per_layer(_flatten(llama_param_shapes(cfg.base)))
    flat = {}
    for name, arr in tensors.items():
        mapped = _hf_to_path(name)
        if mapped is None or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        path, transpose = mapped
        if path not in expected:
            raise CheckpointError(f"{where}: tensor {name} has no place in a {cfg.n_layer}-layer Llama "
                                  f"(tie_word_embeddings={cfg.tie_word_embeddings})")
        want = expected[path]
        want_hf = want[::-1] if transpose else want
        if tuple(arr.shape) != want_hf:
            raise CheckpointError(f"{where}: tensor {name} has shape {tuple(arr.shape)}, the config needs {want_hf}")
        arr = np.asarray(arr, np.float32)
        flat[path] = np.ascontiguousarray(arr.T) if transpose else arr
    missing = sorted(_path_to_hf(p) for p in expected if p not in flat)
    if missing:
        raise CheckpointError(f"{where}: missing tensors {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    return cfg, _unflatten(_stack_layers(flat, cfg.n_layer))


# ----------------------------------------------------------------------------- save
def llama_config_to_hf(cfg: LlamaConfig) -> dict:
    """The HF config.json dict of our LlamaConfig (adapters are not part of it); reads back
    with llama_config_from_hf to the same config."""
    rope = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
    if cfg.rope_scaling is not None:
        sc = cfg.rope_scaling
        rope = {**rope, "rope_type": sc.rope_type, "factor": sc.factor, "low_freq_factor": sc.low_freq_factor,
                "high_freq_factor": sc.high_freq_factor,
                "original_max_position_embeddings": sc.original_max_position_embeddings}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        **{theirs: getattr(cfg, ours) for ours, theirs in _HF_CONFIG_FIELDS.items()},
        "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.dim_head,
        # rope_theta / rope_scaling for transformers 4; transformers 5 reads rope_parameters
        "rope_theta": float(cfg.rope_theta), "rope_parameters": rope,
        "rope_scaling": None if cfg.rope_scaling is None else {k: v for k, v in rope.items() if k != "rope_theta"},
        "tie_word_embeddings": cfg.tie_word_embeddings, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02, "torch_dtype": "float32",
    }


def save_llama(params: dict, cfg: LlamaConfig, out_dir: str, tokenizer=None) -> None:
    """Write the base of `params` as an HF Llama directory (config.json + model.safetensors,
    float32): the scanned `layers` leaves unstacked into model.layers.{i}.*, kernels transposed to
    nn.Linear's [out, in]. Adapter leaves (LoRA, experts, routers) are left out. The directory
    loads with `load_llama` and with `transformers.LlamaForCausalLM.from_pretrained`."""
    from comigs_jax.model.llama import llama_param_shapes

    expected = _per_layer(_flatten(llama_param_shapes(cfg.base)))
    flat = {}
    for path, v in _flatten(dict(params)).items():
        if path[0] == "layers":
            for i in range(np.shape(v)[0]):
                flat[(f"layers_{i}",) + path[1:]] = np.asarray(v)[i]
        else:
            flat[path] = v
    tensors = {}
    for path, shape in expected.items():
        if path not in flat:
            raise CheckpointError(f"save_llama: parameter {'/'.join(path)} is missing")
        arr = np.asarray(flat[path], np.float32)
        if arr.shape != shape:
            raise CheckpointError(f"save_llama: {'/'.join(path)} has shape {arr.shape}, expected {shape}")
        tensors[_path_to_hf(path)] = np.ascontiguousarray(arr.T if path[-1] == "kernel" else arr)
    write_hf_dir(out_dir, tensors, llama_config_to_hf(cfg), tokenizer)
