"""The tied head's cross-entropy in vocabulary blocks (comigs_jax.model.head) against optax on the
full logits, and the training loss and evaluation that use it against the full-logits path."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from comigs_jax.federated.roles import merge, split_base
from comigs_jax.model.config import GPT2Config, LoRAConfig, MoEConfig
from comigs_jax.model.gpt2 import GPT2, init_params
from comigs_jax.model.head import full_logits, head_cross_entropy
from comigs_jax.train.steps import evaluate_user, lm_loss
from tiny import TOL64, forward, random_like

N, D, V = 37, 16, 307  # V prime: no block size below it divides it


def _data(seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(N, D)), dtype)
    emb = jnp.asarray(rng.normal(size=(V, D)), jnp.float32)  # logits of scale ~4: a peaked softmax
    labels = jnp.asarray(rng.integers(0, V, N), jnp.int32)
    weights = jnp.asarray(rng.normal(size=N), jnp.float32)   # d loss / d ce: not all equal
    return x, emb, labels, weights


def _reference(x, emb, labels):
    return optax.softmax_cross_entropy_with_integer_labels(full_logits(x, emb), labels)


@pytest.mark.parametrize("block", [64, 100, 7, V, 1000])  # V % block != 0 (a tail block), = V, > V
def test_blocked_cross_entropy_equals_optax(block):
    x, emb, labels, c = _data()
    ce = jax.jit(head_cross_entropy, static_argnums=3)(x, emb, labels, block)
    ref = _reference(x, emb, labels)
    assert ce.shape == (N,) and ce.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ce), np.asarray(ref), rtol=1e-5, atol=1e-5)
    # Labels in the tail block, at the last whole block's edge and at both ends are counted once.
    edge = jnp.asarray([0, V - 1, V - 2, (V // block) * block - 1 if block < V else 5] * 2, jnp.int32)
    np.testing.assert_allclose(np.asarray(head_cross_entropy(x[:8], emb, edge, block)),
                               np.asarray(_reference(x[:8], emb, edge)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [64, 100, V])
def test_blocked_cross_entropy_gradients_equal_optax(block):
    x, emb, labels, c = _data(1)
    f = lambda x, e: (head_cross_entropy(x, e, labels, block) * c).sum()
    ref = lambda x, e: (_reference(x, e, labels) * c).sum()
    # With respect to x only (the frozen head: the path training takes) ...
    gx = jax.jit(jax.grad(f))(x, emb)
    rgx, rge = jax.grad(ref, argnums=(0, 1))(x, emb)
    scale = np.abs(np.asarray(rgx)).max()
    assert np.abs(np.asarray(gx - rgx)).max() <= 1e-5 * scale
    # ... and with respect to both (a trained head gets its gradient too).
    gx2, ge = jax.jit(jax.grad(f, argnums=(0, 1)))(x, emb)
    assert np.abs(np.asarray(gx2 - rgx)).max() <= 1e-5 * scale
    assert np.abs(np.asarray(ge - rge)).max() <= 1e-5 * np.abs(np.asarray(rge)).max()


def test_blocked_cross_entropy_under_vmap_with_a_shared_head():
    x, emb, labels, c = _data(2)
    xs = jnp.stack([x, 2 * x, -x])  # three users, one frozen embedding
    f = jax.vmap(lambda x: (head_cross_entropy(x, emb, labels, 64) * c).sum())
    r = jax.vmap(lambda x: (_reference(x, emb, labels) * c).sum())
    np.testing.assert_allclose(np.asarray(jax.jit(f)(xs)), np.asarray(r(xs)), rtol=1e-5)
    g = jax.jit(jax.grad(lambda xs: f(xs).sum()))(xs)
    rg = jax.grad(lambda xs: r(xs).sum())(xs)
    assert np.abs(np.asarray(g - rg)).max() <= 1e-5 * np.abs(np.asarray(rg)).max()


def test_blocked_cross_entropy_in_bfloat16_follows_the_full_path():
    """bf16 activations: logits computed in bf16 then float32 (as GPT2's logits); close to the
    full-logits path, not bitwise (blocked sums)."""
    x, emb, labels, c = _data(3, jnp.bfloat16)
    emb = emb * 0.25
    ce = head_cross_entropy(x, emb, labels, 64)
    ref = _reference(x, emb, labels)
    assert ce.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ce), np.asarray(ref), rtol=1e-3, atol=1e-3)
    g = jax.grad(lambda x: (head_cross_entropy(x, emb, labels, 64) * c).sum())(x)
    rg = jax.grad(lambda x: (_reference(x, emb, labels) * c).sum())(x)
    assert g.dtype == jnp.bfloat16
    err = np.abs(np.asarray(g, np.float32) - np.asarray(rg, np.float32)).max()
    assert err <= 2e-2 * np.abs(np.asarray(rg, np.float32)).max()


def _shapes_in(jaxpr):
    """Every variable shape in a closed jaxpr, sub-jaxprs (scan, custom_vjp, pjit) included."""
    out = []

    def walk(j):
        for eqn in j.eqns:
            out.extend(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
            for p in eqn.params.values():
                for sub in (p if isinstance(p, (list, tuple)) else [p]):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        walk(sub)

    walk(jaxpr.jaxpr)
    return out


def test_no_full_logits_in_the_blocked_step():
    x, emb, labels, c = _data()
    step = lambda block: jax.make_jaxpr(jax.value_and_grad(lambda x: (head_cross_entropy(x, emb, labels, block) * c).sum()))(x)
    # The full path materialises [N, V]; the blocked one never holds more than [N, block] (here [N, 64]).
    assert (N, V) in _shapes_in(step(0))
    blocked = _shapes_in(step(64))
    assert (N, V) not in blocked and max(int(np.prod(s)) for s in blocked) <= V * D


def test_head_block_must_be_a_non_negative_integer():
    for bad in (-1, 2.5):
        with pytest.raises(ValueError, match="head_block"):
            GPT2Config(head_block=bad)


# ---------------------------------------------------------------- the loss and evaluation
def _model(dtype="float32"):
    lora = LoRAConfig(rank=4)
    return GPT2Config(vocab_size=V, n_positions=16, n_embd=32, n_layer=2, n_head=2, dtype=dtype,
                      attn_lora=lora, moe=MoEConfig(n_experts=2, n_generalists=1, lora=lora), head_block=0)


def _state(cfg):
    base, tr = split_base(init_params(cfg, jax.random.key(0)))
    base["wte"]["embedding"] = base["wte"]["embedding"] * 50.0  # logits far from uniform
    return base, jax.tree.map(lambda x: x.astype(cfg.dtype), random_like(tr, 0.2, seed=1))


def test_lm_loss_equals_the_full_logits_loss(x64):
    """Two programs (blocked vs full logits): in float64, tests/tiny.py TOL64."""
    cfg = _model("float64")
    base, tr = _state(cfg)
    windows = np.random.default_rng(2).integers(0, V, (3, 9)).astype(np.int32)
    mask = jnp.ones(2, bool)

    def reference(t):  # the loss as the model's logits give it: optax on [B, T, V]
        logits, aux = GPT2(cfg).apply({"params": merge(base, t)}, windows[:, :-1], mask)
        return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean() + 0.01 * aux["lb"].mean()

    ref, ref_g = jax.jit(jax.value_and_grad(reference))(tr)  # jitted as lm_loss: eager rounds differently
    assert float(ref) > 1.0
    for block in (0, 100, 4096):  # full logits; 3 whole blocks + a tail; one block (clamped to V)
        c = dataclasses.replace(cfg, head_block=block)
        (loss, metrics), g = jax.jit(jax.value_and_grad(
            lambda t: lm_loss(t, base, windows, mask, c, 0.01), has_aux=True))(tr)
        np.testing.assert_allclose(float(loss), float(ref), **TOL64)
        for a, b in zip(jax.tree.leaves(ref_g), jax.tree.leaves(g)):
            assert np.abs(np.asarray(b - a)).max() <= TOL64["rtol"] * np.abs(np.asarray(a)).max()


def test_evaluate_user_equals_the_full_logits_evaluation(x64):
    """Two programs (blocked vs full logits): in float64, tests/tiny.py TOL64."""
    cfg = _model("float64")
    base, tr = _state(cfg)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, V, 200), jnp.uint16)
    starts = jnp.arange(0, 8 * 9, 9)
    weights = jnp.asarray([1, 1, 1, 1, 1, 0.5, 1, 0], jnp.float32)
    mask = jnp.ones(2, bool)
    run = lambda block: jax.jit(lambda p: evaluate_user(
        p, base, tokens, starts, weights, mask, model_cfg=dataclasses.replace(cfg, head_block=block),
        seq_len=8, batch=4))(tr)
    ref = run(0)
    assert ref["ce_sum"].shape == (2,) and float(ref["ce_sum"].sum()) > 0
    # head_block 0 is the model's own logits through optax, window by window.
    windows = tokens[starts[:, None] + jnp.arange(9)].astype(jnp.int32)
    logits, _ = forward(cfg, merge(base, tr), windows[:, :-1], mask)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).sum(1) * weights
    np.testing.assert_allclose(np.asarray(ref["ce_sum"]), np.asarray(ce.reshape(2, 4).sum(1)), **TOL64)
    for block in (100, 4096):  # 3 whole blocks + a tail; one block (clamped to V)
        out = run(block)
        np.testing.assert_allclose(np.asarray(out["ce_sum"]), np.asarray(ref["ce_sum"]), **TOL64)
        np.testing.assert_array_equal(np.asarray(out["weight"]), np.asarray(ref["weight"]))
        np.testing.assert_allclose(np.asarray(out["lb"]), np.asarray(ref["lb"]), **TOL64)
