"""model.remat and the lean expert MLP: the same losses and gradients, and what the backward keeps.

What is kept is read off JAX's saved residuals (jax.ad_checkpoint.print_saved_residuals), the
program handed to XLA. XLA's CPU pipeline removes the optimization barriers jax.checkpoint relies on
(its cse_barrier_expander pass) before CSE, which then merges the recomputation back into the
forward pass: on CPU the compiled memory does not change unless that pass is disabled.
"""
import contextlib
import dataclasses
import io
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from comigs_jax.federated.roles import merge, split_base
from comigs_jax.model.config import REMAT, GPT2Config, LoRAConfig, MoEConfig
from comigs_jax.model.gpt2 import GPT2, init_params, token_gate_weights
from comigs_jax.model.hf import load_gpt2
from comigs_jax.model.precision import wide
from comigs_jax.train.steps import lm_loss
from conftest import ASSETS
from tiny import TOL64, random_like

B, T, E = 2, 8, 3


def _cfg(remat="none", dtype="float32", dropout=0.0, head_block=0):
    lora = LoRAConfig(rank=4, dropout=dropout)
    # A vocabulary of 97: no dimension equals another, so residuals are told apart by shape.
    return GPT2Config(vocab_size=97, n_positions=16, n_embd=32, n_layer=2, n_head=2, dtype=dtype,
                      attn_lora=lora, moe=MoEConfig(n_experts=E, n_generalists=1, top_k=2, lora=lora),
                      remat=remat, head_block=head_block)


def _state(cfg):
    """Frozen base and trainable leaves with every LoRA B non-zero (zero B hides expert gradients)."""
    base, tr = split_base(init_params(cfg, jax.random.key(0)))
    tr = jax.tree.map(lambda x: x.astype(wide(jnp.dtype(cfg.dtype))), random_like(tr, 0.3, seed=1))
    windows = np.random.default_rng(2).integers(0, cfg.vocab_size, (B, T + 1)).astype(np.int32)
    return base, tr, windows


def _loss_and_grads(cfg, base, tr, windows, dropout_key=None):
    mask = jnp.array([True, True, False])  # a padded expert slot too
    fn = lambda t: lm_loss(t, base, windows, mask, cfg, 0.01, dropout_key)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(tr)
    return loss, metrics, grads


def _assert_trees_close(a, b, rtol):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        err = np.abs(x - y).max() / max(np.abs(x).max(), 1e-30)
        assert err <= rtol, f"{jax.tree_util.keystr(path)}: relative difference {err:.2e}"


def test_unknown_remat_fails_in_one_line_listing_the_allowed():
    with pytest.raises(ValueError) as e:
        _cfg(remat="blocks")
    msg = str(e.value)
    assert "\n" not in msg and "'blocks'" in msg and all(r in msg for r in REMAT)


# Each remat mode once, the two dropout paths (a key, no key) split between them.
@pytest.mark.parametrize("remat,dropout", [("block", 0.2), ("moe", 0.0)])
def test_remat_gives_the_same_loss_and_gradients(remat, dropout, x64):
    """Two programs (remat or not) of the same loss and gradients: in float64 (tests/tiny.py)."""
    ref_cfg = _cfg(dropout=dropout, dtype="float64")
    base, tr, windows = _state(ref_cfg)
    key = jax.random.key(7) if dropout else None
    loss0, m0, g0 = _loss_and_grads(ref_cfg, base, tr, windows, key)
    loss1, m1, g1 = _loss_and_grads(_cfg(remat, dropout=dropout, dtype="float64"), base, tr, windows, key)
    np.testing.assert_allclose(float(loss1), float(loss0), **TOL64)
    np.testing.assert_allclose(np.asarray(m1["router_prob"]), np.asarray(m0["router_prob"]), **TOL64)
    _assert_trees_close(g0, g1, rtol=TOL64["rtol"])
    # Not vacuous: every trainable group gets a gradient.
    assert all(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(g0))
    if dropout:  # and dropout really is on: another key gives another loss
        loss2, _, _ = _loss_and_grads(ref_cfg, base, tr, windows, jax.random.key(8))
        assert abs(float(loss2) - float(loss0)) > 1e-4


def test_block_remat_keeps_parameter_names_and_loads_hugging_face():
    shapes = lambda cfg: jax.tree.map(lambda x: (x.shape, x.dtype), jax.eval_shape(
        lambda k: init_params(cfg, k), jax.random.key(0)))
    assert shapes(_cfg("block")) == shapes(_cfg("none"))
    assert "h_0" in init_params(_cfg("block"), jax.random.key(0))
    # The plain GPT-2 checkpoint loads and gives the same logits with each remat value.
    cfg, params = load_gpt2(os.path.join(ASSETS, "gpt2_tiny"))
    tokens = jnp.asarray(np.load(os.path.join(ASSETS, "gpt2_tiny_golden.npz"))["input_ids"])
    ref, _ = GPT2(cfg).apply({"params": params}, tokens)
    for remat in ("block", "moe"):
        out, _ = GPT2(dataclasses.replace(cfg, remat=remat)).apply({"params": params}, tokens)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_gate_weights_are_collected_under_block_remat():
    cfg = _cfg()
    params = init_params(cfg, jax.random.key(0))
    tokens = jnp.arange(2 * T).reshape(2, T) % cfg.vocab_size
    w0 = token_gate_weights(cfg, params, tokens)
    w1 = token_gate_weights(dataclasses.replace(cfg, remat="block"), params, tokens)
    assert w0.shape == (cfg.n_layer, 2, T, E)
    np.testing.assert_array_equal(np.asarray(w1), np.asarray(w0))


def _saved(cfg, base, tr, windows):
    """JAX's saved residuals of the loss's gradient: [(dtype, shape, description)]."""
    mask = jnp.ones((E,), bool)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(lambda t: lm_loss(t, base, windows, mask, cfg, 0.01)[0], tr)
    rows = []
    for line in out.getvalue().splitlines():
        m = re.match(r"(\w+)\[([\d,]*)\] (.*)", line)
        if m:
            rows.append((m[1], tuple(int(s) for s in m[2].split(",") if s), m[3]))
    return rows


@pytest.mark.parametrize("dtype,short", [("float32", "f32"), ("bfloat16", "bf16")])
def test_backward_keeps_one_expert_tensor_per_layer(dtype, short):
    """[E, N, 4d]: six per layer before the lean MLP (pre-activation, x^3 term, tanh, 1 - tanh^2
    and two derivative products); now the pre-activation alone, in the activation dtype; none
    with remat "moe"."""
    cfg = _cfg(dtype=dtype)
    base, tr, windows = _state(cfg)
    per_expert = (E, B * T, 4 * cfg.n_embd)
    saved = [r for r in _saved(cfg, base, tr, windows) if r[1] == per_expert]
    assert len(saved) == cfg.n_layer
    assert all(d == short and "moe_pre" in desc for d, _, desc in saved)
    # remat "moe": no [E, N, 4d] at all, and no more [N, 4d] than the shared c_fc output per layer.
    rows = _saved(dataclasses.replace(cfg, remat="moe"), base, tr, windows)
    assert not [r for r in rows if r[1] == per_expert]
    assert len([r for r in rows if r[1] == (B * T, 4 * cfg.n_embd)]) == cfg.n_layer


def test_block_remat_keeps_only_block_inputs():
    cfg = _cfg("block", head_block=64)  # a blocked head keeps [N, d], not exp(logits) [N, V]
    base, tr, windows = _state(cfg)
    big = [r for r in _saved(cfg, base, tr, windows)
           if int(np.prod(r[1])) >= B * T * cfg.n_embd and "constant" not in r[2] and "argument" not in r[2]]
    # Each block's input [B, T, d]; past the blocks only ln_f's and the head's [N, d]: nothing of
    # the attention or the MLP.
    inputs = [r for r in big if "gpt2.py" in r[2]]
    assert len(inputs) == cfg.n_layer and all(r[1] == (B, T, cfg.n_embd) for r in inputs)
    rest = [r for r in big if r not in inputs]
    assert all(("normalization.py" in r[2] or "head.py" in r[2]) and r[1][-1] == cfg.n_embd for r in rest), rest
    # Without block remat the attention and the experts keep far more.
    full = [r for r in _saved(_cfg(head_block=64), base, tr, windows) if int(np.prod(r[1])) >= B * T * cfg.n_embd]
    assert len(full) > 3 * len(big)
