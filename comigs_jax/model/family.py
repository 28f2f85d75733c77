"""A model family as one record: everything the engine, the capacity model, the export and the
base loader need to know about an architecture, so that none of them compares family names.

    fam = family_of(cfg)                    # the Family of a GPT2Config / LlamaConfig (cfg.family)
    fam.module(cfg).apply(...)              # the Flax module; fam.init_params, fam.param_shapes
    fam.load(dir_or_hub_id)                 # (config, base params) of an HF checkpoint; fam.save
    family_named("llama"), family_of_size("gpt2-xl"), checkpoint_family(dir)

A new family is a config class with a `family` class attribute, its module, its HF reader and
writer, its footprint (model/footprint.py) and one `register(Family(...))` line below
(docs/architecture.md, "Where to add things").
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from comigs_jax.model import footprint, gpt2, llama
from comigs_jax.model.config import GPT2_SIZES, LLAMA_SIZES, GPT2Config, LlamaConfig
from comigs_jax.model.hf import CheckpointError, load_gpt2, save_gpt2


@dataclasses.dataclass(frozen=True)
class HFNames:
    """Where a family's adapted matmuls live in Hugging Face's names (the export's peft adapter and
    experts.safetensors): layer i's prefix, the attention module (ours = HF's), its LoRA'd
    projections, the MLP matmuls that carry experts (ours), and whether HF's attention weights are
    Conv1D [in, out] (peft's fan_in_fan_out)."""

    layer_prefix: str
    attn: str
    projections: tuple
    expert_matmuls: tuple
    conv1d: bool


@dataclasses.dataclass(frozen=True)
class Family:
    """One architecture. `name` is cfg.family, HF config.json's model_type and comigs.json's
    `family`; `label` names it in plans; `config` is its config class, `sizes` its named sizes
    (config fields by name). Parameters: `module(cfg)` the Flax module (tokens -> logits, aux),
    `init_params(cfg, key, seq_len)`, `param_shapes(cfg)`, `token_gate_weights(cfg, params, tokens,
    mask)` [L, B, T, E], `head_matrix(params, cfg)` the LM head as [V, d]; `layers_scanned`: its
    blocks are one `layers` subtree with a leading [L] axis (a lax.scan), else `h_{i}` subtrees.
    Checkpoints: `load(source, **overrides)`, `save(params, cfg, out_dir, tokenizer)`,
    `bundled_tokenizer` (the tokenizer name data.tokenizer="base" means for a checkpoint without
    tokenizer files; None: none), `hub_prefix` (hub ids starting with it are this family's, with
    `config()`'s n_positions), `hf_names`. Capacity (model/footprint.py): `shapes(cfg)`,
    `layer_activations(cfg, batch, seq_len, profile, remat)`, `head_norm(n, d, profile, a)`,
    `expert_backward(e, n, f, recompute, a)`."""

    name: str
    label: str
    config: type
    sizes: dict
    module: Callable
    init_params: Callable
    param_shapes: Callable
    token_gate_weights: Callable
    head_matrix: Callable
    layers_scanned: bool
    load: Callable
    save: Callable
    bundled_tokenizer: Optional[str]
    hub_prefix: Optional[str]
    hf_names: HFNames
    shapes: Callable
    layer_activations: Callable
    head_norm: Callable
    expert_backward: Callable
    # the router kinds (config.ROUTER_KINDS) its blocks build: the noisy top-k gate is Llama's only
    router_kinds: tuple = ("learned", "uniform", "user")

    def sized(self, size: str, **fields):
        """The config of a named size (`sizes`), other fields (vocab_size, ...) replaced."""
        return self.config(**{**self.sizes[size], **fields})

    def layer(self, params: dict, i: int) -> dict:
        """Layer i's parameter subtree (scanned [L, ...] leaves indexed, as NumPy)."""
        if self.layers_scanned:
            return jax.tree.map(lambda a: np.asarray(a)[i], params["layers"])
        return params[f"h_{i}"]

    def layer_subtrees(self, layers: list) -> dict:
        """Per-layer subtrees (one per layer, in order) as the top-level entries that hold them:
        {"h_0": ..., "h_1": ...}, or {"layers": the subtrees stacked on a leading [L] axis}."""
        if self.layers_scanned:
            return {"layers": jax.tree.map(lambda *a: np.stack(a), *layers)}
        return {f"h_{i}": sub for i, sub in enumerate(layers)}

    def sown_gates(self, intermediates: dict, n_layer: int):
        """The per-token expert weights the routers sowed in one apply, as [L, B, T, E]."""
        if self.layers_scanned:
            return intermediates["layers"]["gate"][0]
        return jnp.stack([intermediates[f"h_{i}"]["gate"][0] for i in range(n_layer)])


_REGISTRY: dict[str, Family] = {}
DEFAULT = "gpt2"  # the family of a hub id without a known prefix and of a config.json without model_type
PRETRAIN = "gpt2"  # the family of base="pretrain", the small base experiments.run trains on the synthetic chain


def register(family: Family) -> Family:
    _REGISTRY[family.name] = family
    return family


def names() -> tuple:
    return tuple(_REGISTRY)


def family_named(name: str) -> Family:
    """The registered Family called `name`; ValueError (one line) for any other."""
    if name not in _REGISTRY:
        raise ValueError(f"model family {name!r} is not registered: allowed {names()}")
    return _REGISTRY[name]


def family_of(cfg) -> Family:
    """The Family of a model config (its `family` class attribute); ValueError (one line) else."""
    name = getattr(cfg, "family", None)
    if name not in _REGISTRY:
        raise ValueError(f"model config {type(cfg).__name__} has family={name!r}: allowed {names()}")
    return _REGISTRY[name]


def family_of_size(size: str) -> Optional[Family]:
    """The Family one of whose named sizes `size` is (None: no family's)."""
    return next((f for f in _REGISTRY.values() if size in f.sizes), None)


def named_sizes() -> tuple:
    return tuple(s for f in _REGISTRY.values() for s in f.sizes)


def family_of_hub_id(hub_id: str) -> Optional[Family]:
    """The Family whose hub_prefix starts `hub_id` (None: unknown before download)."""
    return next((f for f in _REGISTRY.values() if f.hub_prefix and hub_id.startswith(f.hub_prefix)), None)


def checkpoint_family(ckpt_dir: str) -> Family:
    """The Family of a checkpoint directory, by its config.json's `model_type` (DEFAULT when it
    has none, as HF's GPT-2 configs of old); CheckpointError (one line) for any other."""
    path = os.path.join(ckpt_dir, "config.json")
    try:
        with open(path) as f:
            model_type = json.load(f).get("model_type", DEFAULT)
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt_dir}: config.json is missing") from None
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__})") from None
    if model_type not in _REGISTRY:
        raise CheckpointError(f"{path}: model_type={model_type!r} is not supported: allowed {names()}")
    return _REGISTRY[model_type]


def _load_llama(source: str, **overrides):
    from comigs_jax.model.hf_llama import load_llama
    return load_llama(source, **overrides)


def _save_llama(params: dict, cfg, out_dir: str, tokenizer=None) -> None:
    from comigs_jax.model.hf_llama import save_llama
    save_llama(params, cfg, out_dir, tokenizer)


def _llama_head(params: dict, cfg):
    """A tied Llama's head is its embed_tokens; an untied one's lm_head kernel [d, V], transposed."""
    return params["embed_tokens"]["embedding"] if cfg.tie_word_embeddings else params["lm_head"]["kernel"].T


GPT2 = register(Family(
    name="gpt2", label="GPT-2", config=GPT2Config, sizes=GPT2_SIZES, module=gpt2.GPT2,
    init_params=gpt2.init_params, param_shapes=gpt2.param_shapes, token_gate_weights=gpt2.token_gate_weights,
    head_matrix=lambda params, cfg: params["wte"]["embedding"], layers_scanned=False,
    load=load_gpt2, save=save_gpt2, bundled_tokenizer="gpt2", hub_prefix="gpt2",
    hf_names=HFNames("transformer.h.{}", "attn", ("c_attn", "c_proj"), ("fc", "proj"), True),
    shapes=footprint.gpt2_shapes, layer_activations=footprint.gpt2_layer, head_norm=footprint.gpt2_head_norm,
    expert_backward=footprint.gpt2_expert_backward))

LLAMA = register(Family(
    name="llama", label="Llama", config=LlamaConfig, sizes=LLAMA_SIZES, module=llama.Llama,
    init_params=llama.init_llama_params, param_shapes=llama.llama_param_shapes,
    token_gate_weights=llama.llama_token_gate_weights, head_matrix=_llama_head, layers_scanned=True,
    load=_load_llama, save=_save_llama, bundled_tokenizer=None, hub_prefix=None,
    hf_names=HFNames("model.layers.{}", "self_attn", ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate", "up", "down"),
                     False),
    shapes=footprint.llama_shapes, layer_activations=footprint.llama_layer, head_norm=footprint.llama_head_norm,
    expert_backward=footprint.llama_expert_backward, router_kinds=("learned", "uniform", "user", "noisy_topk")))
