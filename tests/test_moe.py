"""LoRA, gating, load balancing, the mixture-of-experts MLP and roles against NumPy references."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from comigs_jax.federated.roles import ROLES, TRAINABLE_ROLES, label_params, merge, split_base
from comigs_jax.model import moe
from comigs_jax.model.config import GPT2Config, LoRAConfig, MoEConfig
from comigs_jax.model.gpt2 import init_params, param_shapes
from comigs_jax.model.hf import load_gpt2
from comigs_jax.model.lora import LoRADense
from conftest import ASSETS
from tiny import TOL64, forward

GOLDEN_DIR = os.path.join(ASSETS, "gpt2_tiny")


# ---------------------------------------------------------------- NumPy references
def np_softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_gate(z, mask, k):
    """One token: reference gating (method.md §1.5)."""
    z = np.where(mask, z, -np.inf)
    w = np.zeros(len(z))
    if k == 1:
        p = np_softmax(z)
        w[np.argmax(p)] = p.max()
        return w
    idx = np.argsort(-z, kind="stable")[:k]
    w[idx] = np_softmax(z[idx])
    return w


def np_load_balance(z, mask, k, imp):
    """Tokens [N, E]: reference LB (method.md §1.6) over the present experts only."""
    e_i = int(mask.sum())
    z = np.asarray(z, np.float64)[:, mask]          # drop absent experts entirely
    if k == 1:
        z = np_softmax(z)
    k_i = min(k, e_i)
    sel = np.zeros_like(z)
    for n in range(len(z)):
        sel[n, np.argsort(-z[n], kind="stable")[:k_i]] = 1
    v = np.where(sel > 0, z, 0.0)
    q = np_softmax(v) if k > 1 else v
    density, proxy = (sel / k_i).mean(0), q.mean(0)
    f = np.ones(e_i) if imp == 0 else np.array([1 / (e_i * imp)] + [(e_i - 1) / (e_i * (1 - imp))] * (e_i - 1))
    return e_i ** 2 * np.mean(f * density * proxy)


CASES = [  # (E, k, mask)
    (2, 1, [1, 1]), (2, 2, [1, 1]), (4, 2, [1, 1, 1, 1]), (4, 1, [1, 1, 1, 1]),
    (4, 2, [1, 0, 1, 1]), (4, 2, [1, 1, 0, 0]), (4, 2, [1, 0, 0, 0]), (3, 3, [1, 1, 1]), (4, 3, [1, 1, 0, 1]),
]


@pytest.mark.parametrize("n_experts,k,mask", CASES)
def test_gate_matches_numpy(n_experts, k, mask):
    mask = np.array(mask, bool)
    z = np.random.default_rng(n_experts * 10 + k).normal(size=(32, n_experts)).astype(np.float32)
    w = np.asarray(moe.gate(jnp.asarray(z), jnp.asarray(mask), k))
    ref = np.stack([np_gate(t, mask, k) for t in z])
    np.testing.assert_allclose(w, ref, atol=1e-6)
    assert np.all(w[:, ~mask] == 0)
    if k >= 2:  # renormalised over the selected experts
        np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)


def test_single_expert_user_gets_weight_one():
    z = jnp.asarray(np.random.default_rng(0).normal(size=(5, 4)), jnp.float32)
    for k in (1, 2):
        w = moe.gate(z, jnp.array([1, 0, 0, 0], bool), k)
        np.testing.assert_array_equal(np.asarray(w), np.tile([1.0, 0, 0, 0], (5, 1)))


def test_gating_gradient_reaches_only_selected_logits():
    z = jnp.asarray([[0.3, -1.0, 2.0, 0.1]], jnp.float32)  # top-2: slots 2 and 0
    c = jnp.asarray([1.0, 2.0, 3.0, 4.0])
    g = jax.grad(lambda z: (moe.gate(z, jnp.ones(4, bool), 2) * c).sum())(z)
    assert np.all(np.asarray(g)[0, [1, 3]] == 0) and np.all(np.asarray(g)[0, [0, 2]] != 0)
    g = jax.grad(lambda z: (moe.gate(z, jnp.array([1, 1, 0, 0], bool), 2) * c).sum())(z)
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[0, 2:] == 0)


@pytest.mark.parametrize("n_experts,k,mask", CASES)
@pytest.mark.parametrize("imp", [0.5, 0.0, 0.9])
def test_load_balance_matches_numpy(n_experts, k, mask, imp):
    mask = np.array(mask, bool)
    z = np.random.default_rng(7).normal(size=(64, n_experts)).astype(np.float32)
    lb = moe.load_balancing_loss(jnp.asarray(z), jnp.asarray(mask), k, imp)
    np.testing.assert_allclose(float(lb), np_load_balance(z, mask, k, imp), rtol=1e-5)


def test_load_balance_is_constant_at_two_experts_top2():
    mask = jnp.ones(2, bool)
    z = jnp.asarray(np.random.default_rng(3).normal(size=(2, 16, 2)), jnp.float32)
    lb, g = jax.value_and_grad(lambda z: moe.load_balancing_loss(z, mask, 2, 0.5))(z)
    assert float(lb) == pytest.approx(1.0, abs=1e-6)
    assert np.abs(np.asarray(g)).max() < 1e-7
    # ... but not at E = 4, k = 2: there it really pulls the router.
    z4 = jnp.asarray(np.random.default_rng(3).normal(size=(64, 4)), jnp.float32)
    g4 = jax.grad(lambda z: moe.load_balancing_loss(z, jnp.ones(4, bool), 2, 0.5))(z4)
    assert np.abs(np.asarray(g4)).max() > 1e-5


def test_load_balance_single_expert_is_one_over_importance():
    z = jnp.ones((8, 4), jnp.float32)
    lb = moe.load_balancing_loss(z, jnp.array([1, 0, 0, 0], bool), 2, 0.5)
    assert float(lb) == pytest.approx(2.0)


# ---------------------------------------------------------------- LoRA
def test_lora_dense_scale_init_and_output():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 768)), jnp.float32)
    lora = LoRAConfig(rank=8)
    assert lora.scale == pytest.approx(16 / np.sqrt(8))
    assert dataclasses.replace(lora, scaling="lora").scale == pytest.approx(2.0)
    p = LoRADense(32, lora).init(jax.random.key(0), x)["params"]
    a = np.asarray(p["lora_A"])
    assert a.shape == (768, 8) and np.abs(a).max() <= 1 / np.sqrt(768) and np.abs(a).max() > 0.9 / np.sqrt(768)
    assert np.all(np.asarray(p["lora_B"]) == 0)
    p = {**p, "lora_B": jnp.asarray(np.random.default_rng(1).normal(size=(8, 32)), jnp.float32)}
    y = LoRADense(32, lora).apply({"params": p}, x)
    ref = x @ p["kernel"] + p["bias"] + lora.scale * (x @ p["lora_A"]) @ p["lora_B"]
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- MoE MLP
def naive_moe(params, h, w, s):
    """Reference form: every expert runs the whole frozen MLP with its own LoRA (method.md §1.3)."""
    fc, pr = params["c_fc"], params["c_proj"]
    stack = lambda leaf: jnp.concatenate([params[g][leaf] for g in ("generalists", "specialists") if g in params])
    fa, fb, pa, pb = (stack(n) for n in ("fc_A", "fc_B", "proj_A", "proj_B"))
    out = 0
    for e in range(w.shape[-1]):
        g = jax.nn.gelu(h @ fc["kernel"] + fc["bias"] + s * (h @ fa[e]) @ fb[e], approximate=True)
        out = out + w[..., e:e + 1] * (g @ pr["kernel"] + pr["bias"] + s * (g @ pa[e]) @ pb[e])
    return out


@pytest.mark.parametrize("n_experts,n_gen,k", [(2, 1, 2), (4, 1, 2), (3, 2, 1), (2, 0, 2), (2, 2, 2)])
def test_moe_mlp_equals_naive_per_expert_form(n_experts, n_gen, k):
    cfg = MoEConfig(n_experts=n_experts, n_generalists=n_gen, top_k=k, lora=LoRAConfig(rank=4))
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
    mod = moe.MoEMLP(cfg, 16, 2)
    w0 = jnp.ones((2, 5, n_experts)) / n_experts
    params = mod.init(jax.random.key(0), h, w0)["params"]
    params = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.3, jnp.float32), params)
    w = moe.gate(jnp.asarray(rng.normal(size=(2, 5, n_experts)), jnp.float32), jnp.ones(n_experts, bool), k)
    out = mod.apply({"params": params}, h, w)
    ref = naive_moe(params, h, w, cfg.lora.scale)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("remat", ["none", "moe"])
def test_moe_mlp_gradients_equal_naive_per_expert_form(remat):
    """The lean MLP (only the pre-activation kept, GELU recomputed in the backward) against
    autodiff of the naive form: gradients of the LoRA factors, the input and the gate weights."""
    cfg = MoEConfig(n_experts=3, n_generalists=1, top_k=2, lora=LoRAConfig(rank=4))
    rng = np.random.default_rng(1)
    h = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
    mod = moe.MoEMLP(cfg, 16, 2, remat=remat)
    params = mod.init(jax.random.key(0), h, jnp.ones((2, 5, 3)) / 3)["params"]
    params = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.3, jnp.float32), params)
    frozen = {k: params[k] for k in ("c_fc", "c_proj")}
    lora = {k: v for k, v in params.items() if k not in frozen}
    w = moe.gate(jnp.asarray(rng.normal(size=(2, 5, 3)), jnp.float32), jnp.ones(3, bool), 2)
    probe = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)  # a loss that weighs every output
    loss = lambda t, h, w: (mod.apply({"params": {**frozen, **t}}, h, w) * probe).sum()
    ref_loss = lambda t, h, w: (naive_moe({**frozen, **t}, h, w, cfg.lora.scale) * probe).sum()
    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(lora, h, w)
    ref = jax.grad(ref_loss, argnums=(0, 1, 2))(lora, h, w)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref), jax.tree.leaves(got)):
        a, b = np.asarray(a), np.asarray(b)
        scale = np.abs(a).max()
        assert scale > 0, jax.tree_util.keystr(path)
        # Relative to the leaf's largest entry: the two forms sum in different orders (f32).
        assert np.abs(b - a).max() <= 1e-5 * scale, (jax.tree_util.keystr(path), np.abs(b - a).max() / scale)


def test_gradients_reach_only_selected_experts():
    cfg = MoEConfig(n_experts=4, n_generalists=1, top_k=2, lora=LoRAConfig(rank=4))
    h = jnp.asarray(np.random.default_rng(0).normal(size=(1, 1, 16)), jnp.float32)
    mod = moe.MoEMLP(cfg, 16, 2)
    params = mod.init(jax.random.key(0), h, jnp.ones((1, 1, 4)))["params"]
    w = moe.gate(jnp.asarray([[[0.1, 2.0, -1.0, 1.5]]]), jnp.ones(4, bool), 2)  # slots 1 and 3
    grads = jax.grad(lambda p: mod.apply({"params": p}, h, w).sum())(params)
    gen = np.asarray(grads["generalists"]["fc_B"])      # slot 0
    spec = np.asarray(grads["specialists"]["fc_B"])     # slots 1, 2, 3
    assert np.all(gen == 0) and np.all(spec[1] == 0)
    assert np.abs(spec[0]).max() > 0 and np.abs(spec[2]).max() > 0


# ---------------------------------------------------------------- whole model
def _tiny(moe_cfg, **kw):
    return GPT2Config(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                      attn_lora=LoRAConfig(), moe=moe_cfg, **kw)


def _with_base(cfg, base, key):
    _, trainable = split_base(init_params(cfg, key))
    return merge(base, trainable)


@pytest.mark.parametrize("moe_cfg,mask", [
    (MoEConfig(n_experts=2, top_k=2), [1, 1]),
    (MoEConfig(n_experts=4, top_k=2), [1, 0, 1, 1]),
    (MoEConfig(n_experts=4, top_k=2), [1, 0, 0, 0]),
    (MoEConfig(n_experts=3, top_k=3, n_generalists=2), [1, 1, 0]),
    (MoEConfig(n_experts=4, router="uniform"), [1, 1, 0, 1]),
])
def test_zero_b_gives_plain_gpt2_logits(moe_cfg, mask, x64):
    """Two programs (the mixture's cheap form vs the plain MLP): in float64, tests/tiny.py TOL64."""
    base_cfg, base = load_gpt2(GOLDEN_DIR)
    base_cfg = dataclasses.replace(base_cfg, dtype="float64")
    tokens = jnp.asarray(np.load(os.path.join(ASSETS, "gpt2_tiny_golden.npz"))["input_ids"])
    plain, _ = forward(base_cfg, base, tokens)
    cfg = _tiny(moe_cfg, dtype="float64")
    params = _with_base(cfg, base, jax.random.key(1))
    # Random routers and A's; B stays 0.
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: rng.standard_normal(x.shape) if "router" in str(p) else x, params)
    logits, _ = forward(cfg, params, tokens, jnp.asarray(mask, bool))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(plain), **TOL64)


def test_padded_user_equals_unpadded_user(x64):
    """Two programs (2 experts vs 4 slots, 2 masked): in float64, tests/tiny.py TOL64."""
    base_cfg, base = load_gpt2(GOLDEN_DIR)
    tokens = jnp.asarray(np.load(os.path.join(ASSETS, "gpt2_tiny_golden.npz"))["input_ids"])
    cfg2, cfg4 = _tiny(MoEConfig(n_experts=2), dtype="float64"), _tiny(MoEConfig(n_experts=4), dtype="float64")
    rng = np.random.default_rng(0)
    p2 = jax.tree.map(lambda x: x, _with_base(cfg2, base, jax.random.key(0)))
    _, t2 = split_base(p2)
    t2 = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.1), t2)
    _, t4 = split_base(init_params(cfg4, jax.random.key(5)))
    t4 = jax.tree.map(lambda x: x, t4)
    for i in range(cfg4.n_layer):  # copy the 2 real experts and router columns into the 4-slot user
        blk2, blk4 = t2[f"h_{i}"], t4[f"h_{i}"]
        blk4["attn"] = blk2["attn"]
        blk4["mlp"]["generalists"] = blk2["mlp"]["generalists"]
        blk4["mlp"]["specialists"] = {n: blk4["mlp"]["specialists"][n].at[0].set(v[0])
                                      for n, v in blk2["mlp"]["specialists"].items()}
        blk4["router"]["kernel"] = blk4["router"]["kernel"].at[:, :2].set(blk2["router"]["kernel"])
    l2, a2 = forward(cfg2, merge(base, t2), tokens)
    l4, a4 = forward(cfg4, merge(base, t4), tokens, jnp.array([1, 1, 0, 0], bool))
    np.testing.assert_allclose(np.asarray(l4), np.asarray(l2), **TOL64)
    np.testing.assert_allclose(np.asarray(a4["lb"]), np.asarray(a2["lb"]), **TOL64)
    np.testing.assert_allclose(np.asarray(a4["router_prob"])[:, :2], np.asarray(a2["router_prob"]), **TOL64)


def test_lb_input_switch_changes_only_the_balance_loss():
    cfg_b = _tiny(MoEConfig(n_experts=4, top_k=2, lb_input="block_output"))
    cfg_r = dataclasses.replace(cfg_b, moe=dataclasses.replace(cfg_b.moe, lb_input="router_input"))
    params = init_params(cfg_b, jax.random.key(0))
    tokens = jnp.arange(32).reshape(2, 16)
    lb_, ab = forward(cfg_b, params, tokens)
    lr_, ar = forward(cfg_r, params, tokens)
    np.testing.assert_array_equal(np.asarray(lb_), np.asarray(lr_))
    assert np.abs(np.asarray(ab["lb"]) - np.asarray(ar["lb"])).max() > 1e-6


def test_routing_stats_shapes_and_sums():
    cfg = _tiny(MoEConfig(n_experts=4, top_k=2))
    params = init_params(cfg, jax.random.key(0))
    _, aux = forward(cfg, params, jnp.arange(32).reshape(2, 16), jnp.array([1, 1, 1, 0], bool))
    for key in ("router_prob", "selection"):
        assert aux[key].shape == (2, 4)
        np.testing.assert_allclose(np.asarray(aux[key]).sum(-1), 1.0, atol=1e-5)
        assert np.all(np.asarray(aux[key])[:, 3] == 0)


def test_trainable_parameter_count_gpt2_124m_1g1s():
    cfg = GPT2Config(attn_lora=LoRAConfig(rank=8), moe=MoEConfig(n_experts=2, n_generalists=1, lora=LoRAConfig(rank=8)))
    shapes = param_shapes(cfg)
    labels = label_params(shapes)
    count = {r: 0 for r in ROLES}
    for s, r in zip(jax.tree.leaves(shapes), jax.tree.leaves(labels)):
        count[r] += int(np.prod(s.shape))
    assert count["attn"] == 12 * 36_864
    assert count["generalist"] == count["specialist"] == 12 * 61_440
    assert count["router"] == 12 * 1_536
    assert sum(count[r] for r in TRAINABLE_ROLES) == 1_935_360
    assert count["base"] == 124_439_808


@pytest.mark.parametrize("moe_cfg", [MoEConfig(), MoEConfig(n_experts=4, n_generalists=2),
                                     MoEConfig(n_experts=3, n_generalists=0), MoEConfig(router="uniform")])
def test_roles_cover_every_leaf_once(moe_cfg):
    shapes = param_shapes(_tiny(moe_cfg))
    flat = traverse_util.flatten_dict(shapes)
    labels = traverse_util.flatten_dict(label_params(shapes))
    assert labels.keys() == flat.keys() and set(labels.values()) <= set(ROLES)
    base, trainable = split_base(shapes)
    fb, ft = traverse_util.flatten_dict(base), traverse_util.flatten_dict(trainable)
    assert not (fb.keys() & ft.keys()) and (fb.keys() | ft.keys()) == flat.keys()
    assert all(labels[p] != "base" for p in ft) and all(labels[p] == "base" for p in fb)
    expect = {"attn", "router"} - ({"router"} if moe_cfg.router == "uniform" else set())
    expect |= {"generalist"} if moe_cfg.n_generalists else set()
    expect |= {"specialist"} if moe_cfg.n_specialists else set()
    assert {labels[p] for p in ft} == expect
    # The generalist leaves hold exactly n_generalists expert slots.
    gen = [v for p, v in ft.items() if labels[p] == "generalist"]
    assert all(v.shape[0] == moe_cfg.n_generalists for v in gen)
