"""GPT-2 against Hugging Face's PyTorch GPT-2 (golden logits made by tests/assets/make_gpt2_golden.py)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from comigs_jax.model.config import GPT2Config
from comigs_jax.model.gpt2 import init_params
from comigs_jax.model.hf import load_gpt2
from conftest import ASSETS
from tiny import forward

GOLDEN_DIR = os.path.join(ASSETS, "gpt2_tiny")


@pytest.fixture(scope="module")
def golden():
    return np.load(os.path.join(ASSETS, "gpt2_tiny_golden.npz"))


def test_logits_match_hugging_face(golden):
    cfg, params = load_gpt2(GOLDEN_DIR)
    assert (cfg.n_layer, cfg.n_embd, cfg.vocab_size) == (2, 64, 512)
    logits, aux = forward(cfg, params, jnp.asarray(golden["input_ids"]))
    assert aux == {}
    ref = golden["logits"]
    assert logits.dtype == jnp.float32 and logits.shape == ref.shape
    err = np.abs(np.asarray(logits) - ref).max()
    assert err <= 1e-4, f"max |logit difference| {err}"
    # The comparison is not vacuous: the logits vary far more than the tolerance.
    assert np.abs(ref).max() > 0.5


def test_bfloat16_activations_keep_float32_params(golden):
    cfg, params = load_gpt2(GOLDEN_DIR, dtype="bfloat16")
    logits, _ = forward(cfg, params, jnp.asarray(golden["input_ids"]))
    assert logits.dtype == jnp.float32
    assert all(p.dtype == np.float32 for p in jax.tree.leaves(params))
    err = np.abs(np.asarray(logits) - golden["logits"]).max()
    assert err < 0.1  # bf16 activations: close, not exact


def test_causal():
    """The logits at position t do not depend on tokens after t."""
    cfg = GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    params = init_params(cfg, jax.random.key(0))
    a = jnp.arange(12).reshape(1, 12) % 128
    b = a.at[0, 8:].set(7)
    la, _ = forward(cfg, params, a)
    lb, _ = forward(cfg, params, b)
    np.testing.assert_allclose(la[0, :8], lb[0, :8], atol=1e-6)
    assert np.abs(np.asarray(la[0, 8:] - lb[0, 8:])).max() > 1e-4


def test_gpt2_124m_shapes():
    from comigs_jax.model.gpt2 import param_shapes
    shapes = param_shapes(GPT2Config())
    n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    assert n == 124_439_808  # GPT-2 small, lm_head tied
