"""The language model of a config, whichever family it is: GPT-2 (gpt2.py) or Llama (llama.py).

The engine (comigs_jax.train, .experiment, .capacity, experiments.bench) builds models, parameters
and heads only through these functions, so every method, chunking, sharding and checkpoint works
for either family. Each reads the config's Family record (model/family.py): nothing here
compares family names.
"""
from __future__ import annotations

import os
from typing import Optional, Union

import flax.linen as nn
import jax

from comigs_jax.model import family as families
from comigs_jax.model.config import GPT2Config, LlamaConfig

ModelConfig = Union[GPT2Config, LlamaConfig]


def family_of(cfg: ModelConfig) -> str:
    """cfg.family, the name of a registered Family; a one-line ValueError for any other config."""
    return families.family_of(cfg).name


def language_model(cfg: ModelConfig) -> nn.Module:
    """The Flax module: tokens [B, T] -> (logits [B, T, V] | hidden [B, T, d], aux)."""
    return families.family_of(cfg).module(cfg)


def init_params(cfg: ModelConfig, key: jax.Array, seq_len: int = 8) -> dict:
    """Random parameters of the whole model (base and adapters), jitted."""
    return families.family_of(cfg).init_params(cfg, key, seq_len)


def param_shapes(cfg: ModelConfig) -> dict:
    """The parameter tree as ShapeDtypeStructs, nothing allocated."""
    return families.family_of(cfg).param_shapes(cfg)


def token_gate_weights(cfg: ModelConfig, params: dict, tokens: jax.Array,
                       expert_mask: Optional[jax.Array] = None) -> jax.Array:
    """Per-token expert weights [L, B, T, E] of a mixture-of-experts model."""
    return families.family_of(cfg).token_gate_weights(cfg, params, tokens, expert_mask)


def head_matrix(params: dict, cfg: ModelConfig) -> jax.Array:
    """The LM head as [V, d] (logits = hidden @ head.T): the tied token embedding (GPT-2's `wte`,
    a tied Llama's `embed_tokens`), or an untied Llama's `lm_head` kernel [d, V] transposed."""
    return families.family_of(cfg).head_matrix(params, cfg)


def checkpoint_family(ckpt_dir: str) -> str:
    """The family name from a checkpoint directory's config.json `model_type` (GPT-2 when it has
    none, as HF's GPT-2 configs of old); CheckpointError (one line) for an unregistered one."""
    return families.checkpoint_family(ckpt_dir).name


def load_checkpoint(source: str) -> tuple[ModelConfig, dict]:
    """(config, base params) of an HF checkpoint directory (its family by config.json's
    model_type) or hub id (families.DEFAULT's loader)."""
    fam = families.checkpoint_family(source) if os.path.isdir(source) else families.family_named(families.DEFAULT)
    return fam.load(source)
