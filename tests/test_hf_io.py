"""Checkpoint and tokenizer I/O: round trips, HF compatibility, clear errors."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from comigs_jax.model.config import GPT2Config, LoRAConfig, MoEConfig
from comigs_jax.model.gpt2 import init_params
from comigs_jax.model.hf import CheckpointError, load_gpt2, load_tokenizer, save_gpt2
from conftest import ASSETS, write_safetensors

GOLDEN_DIR = os.path.join(ASSETS, "gpt2_tiny")


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_save_load_round_trip(tmp_path):
    cfg = GPT2Config(vocab_size=300, n_positions=40, n_embd=48, n_layer=3, n_head=3)
    params = init_params(cfg, jax.random.key(1))
    save_gpt2(params, cfg, str(tmp_path / "ckpt"))
    cfg2, params2 = load_gpt2(str(tmp_path / "ckpt"))
    assert cfg2 == cfg
    _assert_trees_equal(params, params2)


def test_saved_layout_matches_hugging_face(tmp_path):
    """What we write has exactly the tensor names and shapes that transformers wrote."""
    cfg, params = load_gpt2(GOLDEN_DIR)
    save_gpt2(params, cfg, str(tmp_path / "out"))
    ours = load_file(str(tmp_path / "out" / "model.safetensors"))
    theirs = load_file(os.path.join(GOLDEN_DIR, "model.safetensors"))
    theirs = {k: v for k, v in theirs.items() if k != "lm_head.weight"}
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k])
    from transformers import GPT2Config as HFConfig
    hf = HFConfig.from_pretrained(str(tmp_path / "out"))
    assert (hf.n_layer, hf.n_embd, hf.vocab_size, hf.activation_function) == (2, 64, 512, "gelu_new")


def test_save_drops_adapters_and_loads_into_moe_model(tmp_path):
    cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                     attn_lora=LoRAConfig(), moe=MoEConfig())
    params = init_params(cfg, jax.random.key(0))
    save_gpt2(params, cfg, str(tmp_path / "c"))
    cfg2, base = load_gpt2(str(tmp_path / "c"), attn_lora=LoRAConfig(), moe=MoEConfig())
    assert cfg2 == cfg
    assert "lora_A" not in base["h_0"]["attn"]["c_attn"] and "router" not in base["h_0"]


def test_unprefixed_hub_layout_loads(tmp_path):
    """The hub's `gpt2` stores names without 'transformer.' and carries attn.bias buffers."""
    d = tmp_path / "hub"
    shutil.copytree(GOLDEN_DIR, d)
    t = load_file(str(d / "model.safetensors"))
    t = {k.replace("transformer.", ""): v for k, v in t.items()}
    t["h.0.attn.bias"] = np.ones((1, 1, 64, 64), np.float32)
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    _, a = load_gpt2(str(d))
    _, b = load_gpt2(GOLDEN_DIR)
    _assert_trees_equal(a, b)


def test_wrong_shape_is_a_clear_error(tmp_path):
    d = tmp_path / "bad"
    shutil.copytree(GOLDEN_DIR, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["n_embd"], cfg["n_head"] = 32, 4
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"tensor .* has shape .* the config needs"):
        load_gpt2(str(d))


def test_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_gpt2(str(tmp_path / "nowhere"))
    d = tmp_path / "noweights"
    d.mkdir()
    shutil.copy(os.path.join(GOLDEN_DIR, "config.json"), d)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_gpt2(str(d))
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_gpt2(str(d))


@pytest.mark.parametrize("keep", [0, 7, 100, -16])
def test_damaged_weights_are_a_clear_error(tmp_path, keep):
    """Empty, cut inside the header, cut inside the data: one line naming the file."""
    d = tmp_path / "damaged"
    shutil.copytree(GOLDEN_DIR, d)
    st = d / "model.safetensors"
    size = st.stat().st_size
    with open(st, "r+b") as f:
        f.truncate(keep if keep >= 0 else size + keep)
    with pytest.raises(CheckpointError, match="model.safetensors cannot be read .*damaged or incomplete") as e:
        load_gpt2(str(d))
    assert "\n" not in str(e.value)


def test_bfloat16_weights_load_as_float32(tmp_path):
    """A GPT-2 checkpoint stored in bfloat16 (as HF's Llama ones are) loads, each weight the
    float32 value of its bfloat16 rounding."""
    import ml_dtypes
    d = tmp_path / "bf16"
    shutil.copytree(GOLDEN_DIR, d)
    ref = load_file(str(d / "model.safetensors"))
    write_safetensors(str(d / "model.safetensors"), ref, "BF16", ml_dtypes.bfloat16)
    _, want = load_gpt2(GOLDEN_DIR)
    _, got = load_gpt2(str(d))
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        assert g.dtype == np.float32, path
        np.testing.assert_array_equal(g, np.asarray(w).astype(ml_dtypes.bfloat16).astype(np.float32), str(path))
    assert any(not np.array_equal(g, w) for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


def test_missing_tensor_is_a_clear_error(tmp_path):
    d = tmp_path / "partial"
    shutil.copytree(GOLDEN_DIR, d)
    t = load_file(str(d / "model.safetensors"))
    del t["transformer.h.1.mlp.c_fc.weight"]
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing tensors.*h.1.mlp.c_fc.weight"):
        load_gpt2(str(d))


def test_hub_id_offline_is_a_clear_error():
    with pytest.raises(CheckpointError, match="cannot fetch checkpoint 'gpt2-medium'.*local directory"):
        load_gpt2("gpt2-medium")


def test_pickle_checkpoint_is_never_unpickled(tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(os.path.join(GOLDEN_DIR, "config.json"), d)
    (d / "pytorch_model.bin").write_bytes(b"not read")
    try:
        import torch  # noqa: F401
    except ImportError:
        with pytest.raises(CheckpointError, match="never unpickled"):
            load_gpt2(str(d))


def test_gpt2_tokenizer_offline():
    tok = load_tokenizer()
    assert len(tok) == 50257 and tok.eos_token_id == 50256
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert tok(" Hello world")["input_ids"] == [18435, 995]
    text = "Grüße, 東京! ∑ x²"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_tokenizer_round_trips_through_a_checkpoint_dir(tmp_path):
    tok = load_tokenizer("gpt2")
    tok.save_pretrained(str(tmp_path))
    tok2 = load_tokenizer(str(tmp_path))
    assert tok2("Hello world")["input_ids"] == [15496, 995] and len(tok2) == 50257
