"""The language model of a config, whichever family it is: GPT-2 (gpt2.py) or Llama (llama.py).

The engine (comigs_jax.train, .experiment, .capacity, experiments.bench) builds models, parameters
and heads only through these functions, so every method, chunking, sharding and checkpoint works
for either family. They dispatch on the config's `family` ("gpt2" | "llama").
"""
from __future__ import annotations

import json
import os
from typing import Optional, Union

import flax.linen as nn
import jax

from comigs_jax.model import gpt2, llama
from comigs_jax.model.config import GPT2Config, LlamaConfig
from comigs_jax.model.hf import CheckpointError, load_gpt2

ModelConfig = Union[GPT2Config, LlamaConfig]
FAMILIES = ("gpt2", "llama")


def family_of(cfg: ModelConfig) -> str:
    """cfg.family ("gpt2" | "llama"); a one-line ValueError for any other config."""
    family = getattr(cfg, "family", None)
    if family not in FAMILIES:
        raise ValueError(f"model config {type(cfg).__name__} has family={family!r}: allowed {FAMILIES}")
    return family


def language_model(cfg: ModelConfig) -> nn.Module:
    """The Flax module: tokens [B, T] -> (logits [B, T, V] | hidden [B, T, d], aux)."""
    return gpt2.GPT2(cfg) if family_of(cfg) == "gpt2" else llama.Llama(cfg)


def init_params(cfg: ModelConfig, key: jax.Array, seq_len: int = 8) -> dict:
    """Random parameters of the whole model (base and adapters), jitted."""
    if family_of(cfg) == "gpt2":
        return gpt2.init_params(cfg, key, seq_len)
    return llama.init_llama_params(cfg, key, seq_len)


def param_shapes(cfg: ModelConfig) -> dict:
    """The parameter tree as ShapeDtypeStructs, nothing allocated."""
    return gpt2.param_shapes(cfg) if family_of(cfg) == "gpt2" else llama.llama_param_shapes(cfg)


def token_gate_weights(cfg: ModelConfig, params: dict, tokens: jax.Array,
                       expert_mask: Optional[jax.Array] = None) -> jax.Array:
    """Per-token expert weights [L, B, T, E] of a mixture-of-experts model."""
    if family_of(cfg) == "gpt2":
        return gpt2.token_gate_weights(cfg, params, tokens, expert_mask)
    return llama.llama_token_gate_weights(cfg, params, tokens, expert_mask)


def head_matrix(params: dict, cfg: ModelConfig) -> jax.Array:
    """The LM head as [V, d] (logits = hidden @ head.T): the tied token embedding (GPT-2's `wte`,
    a tied Llama's `embed_tokens`), or an untied Llama's `lm_head` kernel [d, V] transposed."""
    if family_of(cfg) == "gpt2":
        return params["wte"]["embedding"]
    if cfg.tie_word_embeddings:
        return params["embed_tokens"]["embedding"]
    return params["lm_head"]["kernel"].T


def checkpoint_family(ckpt_dir: str) -> str:
    """"gpt2" or "llama" from a checkpoint directory's config.json `model_type` (GPT-2 when it
    has none, as HF's GPT-2 configs of old); CheckpointError (one line) for any other."""
    path = os.path.join(ckpt_dir, "config.json")
    try:
        with open(path) as f:
            model_type = json.load(f).get("model_type", "gpt2")
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt_dir}: config.json is missing") from None
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__})") from None
    if model_type not in FAMILIES:
        raise CheckpointError(f"{path}: model_type={model_type!r} is not supported: allowed {FAMILIES}")
    return model_type


def load_checkpoint(source: str) -> tuple[ModelConfig, dict]:
    """(config, base params) of an HF checkpoint directory or hub id, GPT-2 or Llama by its
    config.json's model_type."""
    if os.path.isdir(source) and checkpoint_family(source) == "llama":
        from comigs_jax.model.hf_llama import load_llama
        return load_llama(source)
    return load_gpt2(source)
