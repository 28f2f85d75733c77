"""The Llama reference's router, model.router_kind="noisy_topk" (comigs_jax.model.noisy_gate):
2d42464's TopKBalancedNoisyGate against a NumPy transcription (values and gradients), its smooth
load against scipy.stats.norm, the noise scale over many tokens, and its place in the engine."""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util
from scipy.stats import norm

from comigs_jax import configuration
from comigs_jax.errors import ConfigError
from comigs_jax.experiment.simulation import Simulation
from comigs_jax.federated.methods import configure_model, get_method
from comigs_jax.federated.roles import role_of, split_base
from comigs_jax.model import noisy_gate
from comigs_jax.model.config import GPT2Config, LlamaConfig, LoRAConfig, MoEConfig
from comigs_jax.model.lm import init_params, language_model
from comigs_jax.train.state import TrainConfig
from comigs_jax.train.steps import _needs_dropout_key, lm_loss
from tiny import VOCAB, markov_users, random_like, tiny_cfg

from configs import base as base_config


# ------------------------------------------------------------------ NumPy transcription (2d42464)

def np_cv2(x):
    return 0.0 if len(x) == 1 else x.var(ddof=1) / (x.mean() ** 2 + 1e-10)


def np_gate(clean, k, eps=None, control=None):
    """TopKBalancedNoisyGate.forward line by line (use_softmax, use_balance, add_noise), float64."""
    n, e = clean.shape
    noise = None if eps is None else eps * control
    logits = clean if eps is None else clean + noise
    order = np.argsort(-logits, axis=1, kind="stable")[:, :min(k + 1, e)]
    top = np.take_along_axis(logits, order, 1)
    s = np.exp(top[:, :k] - top[:, :k].max(1, keepdims=True))
    s /= s.sum(1, keepdims=True)
    filt = np.zeros_like(logits)
    np.put_along_axis(filt, order[:, :k], s, 1)
    importance = filt.sum(0)
    if eps is not None and k != e:
        thr_in, thr_out = top[:, k:k + 1], top[:, k - 1:k]
        is_in = noise > thr_in
        load = np.where(is_in, norm.cdf((clean - thr_in) / control), norm.cdf((clean - thr_out) / control)).sum(0)
    else:
        load = (filt > 0).sum(0).astype(float)
    return filt, importance, load, np_cv2(importance) + np_cv2(load)


def np_router(x, w_gate, w_mix):
    return np.tanh(x @ w_gate) @ w_mix


def _inputs(n, e, seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, e)), rng.normal(size=(n, e)), 0.3 + rng.random((n, e))


@pytest.mark.parametrize("e,k", [(4, 2), (2, 2), (3, 1)])
def test_gate_values_match_numpy(x64, e, k):
    clean, eps, control = _inputs(50, e, e + k)
    for train in (True, False):
        args = (eps, control) if train else (None, None)
        out = noisy_gate.noisy_topk_gate(jnp.asarray(clean), k, *(None if a is None else jnp.asarray(a) for a in args))
        filt, imp, load, bal = np_gate(clean, k, *args)
        np.testing.assert_allclose(out["weights"], filt, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(out["importance"], imp, rtol=1e-12)
        np.testing.assert_allclose(out["load"], load, rtol=1e-12)
        np.testing.assert_allclose(out["balance"], bal, rtol=1e-10)
    if e == k == 2:  # cv^2(importance) = 2 mean(p0 - p1)^2: a real pull toward equal shares
        p = np.asarray(out["weights"])
        np.testing.assert_allclose(np_cv2(p.sum(0)), 2 * np.mean(p[:, 0] - p[:, 1]) ** 2, rtol=1e-10)


@pytest.mark.parametrize("e,k", [(4, 2), (2, 2)])
def test_router_gradients_match_numpy_finite_differences(x64, e, k):
    """d/dW of sum(weights * R) + balance through the tanh MLP with the training noise injected:
    jax.grad against central differences of the NumPy transcription."""
    rng = np.random.default_rng(7)
    n, d = 24, 5
    x, w_gate, w_mix = rng.normal(size=(n, d)), rng.normal(size=(d, e)), rng.normal(size=(e, e))
    eps, w_noise, r = rng.normal(size=(n, e)), 0.5 * rng.normal(size=(d, e)), rng.normal(size=(n, e))
    control = np.log1p(np.exp(x @ w_noise)) + 0.01

    def np_obj(wg, wm):
        filt, _, _, bal = np_gate(np_router(x, wg, wm), k, eps, control)
        return (filt * r).sum() + bal

    def jax_obj(wg, wm):
        out = noisy_gate.noisy_topk_gate(jnp.tanh(x @ wg) @ wm, k, jnp.asarray(eps), jnp.asarray(control))
        return (out["weights"] * r).sum() + out["balance"]

    np.testing.assert_allclose(jax_obj(w_gate, w_mix), np_obj(w_gate, w_mix), rtol=1e-10)
    grads = jax.grad(jax_obj, argnums=(0, 1))(jnp.asarray(w_gate), jnp.asarray(w_mix))
    h = 1e-6
    for i, (w, g) in enumerate(zip((w_gate, w_mix), grads)):
        num = np.zeros_like(w)
        for idx in np.ndindex(w.shape):
            dw = np.zeros_like(w); dw[idx] = h
            args_p = [w_gate, w_mix]; args_m = [w_gate, w_mix]
            args_p[i], args_m[i] = w + dw, w - dw
            num[idx] = (np_obj(*args_p) - np_obj(*args_m)) / (2 * h)
        assert np.abs(num).max() > 1e-3  # the objective depends on the router
        np.testing.assert_allclose(g, num, rtol=1e-5, atol=1e-7)


def test_smooth_load_is_the_normal_cdf_of_staying_in_the_top_k(x64):
    """Where the reference's `is_in` test (noise alone vs the (k+1)-th noisy logit) agrees with
    true top-k membership, each token's term is P(clean_e + eps' c_e beats the k-th largest of the
    other experts' noisy logits) = Phi((clean_e - that threshold) / c_e), computed directly."""
    e, k, n = 5, 2, 400
    clean, eps, control = _inputs(n, e, 3)
    noisy = clean + eps * control
    out = noisy_gate.noisy_topk_gate(jnp.asarray(clean), k, jnp.asarray(eps), jnp.asarray(control))
    prob_direct = np.zeros((n, e))
    member = np.zeros((n, e), bool)
    ref_in = np.zeros((n, e), bool)
    for t in range(n):
        order = np.sort(noisy[t])[::-1]
        for j in range(e):
            others = np.sort(np.delete(noisy[t], j))[::-1]
            prob_direct[t, j] = 1.0 - norm.cdf(others[k - 1], loc=clean[t, j], scale=control[t, j])
            member[t, j] = noisy[t, j] >= order[k - 1]
            ref_in[t, j] = eps[t, j] * control[t, j] > order[k]
    _, _, load_ref, _ = np_gate(clean, k, eps, control)
    np.testing.assert_allclose(out["load"], load_ref, rtol=1e-12)
    agree = member == ref_in
    rebuilt = np.where(agree, prob_direct, 0.0).sum(0)
    # the reference's per-token terms, recomputed where the two tests agree
    thr_in, thr_out = np.sort(noisy, 1)[:, ::-1][:, k:k + 1], np.sort(noisy, 1)[:, ::-1][:, k - 1:k]
    ref_terms = np.where(ref_in, norm.cdf((clean - thr_in) / control), norm.cdf((clean - thr_out) / control))
    np.testing.assert_allclose(np.where(agree, ref_terms, 0.0).sum(0), rebuilt, rtol=1e-10)
    np.testing.assert_allclose(ref_terms.sum(0), load_ref, rtol=1e-12)
    assert agree.mean() > 0.5 and not agree.all()  # the quirk is real: it differs on some tokens


def test_noise_scale_over_many_tokens():
    """Training noise eps * (softplus(x W_noise) + 0.01): per token and expert its sample std over
    N draws is within 5 standard errors (c / sqrt(2N)) of c computed from the sown W_noise, its mean
    within 5 c / sqrt(N); W_noise's entries have std 0.02 (5 standard errors); evaluation adds none."""
    d, e, n = 256, 4, 20000
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(2, d)).astype(np.float32)
    x = jnp.asarray(np.repeat(rows, n, axis=0))
    router = noisy_gate.NoisyTopKRouter(e)
    params = router.init(jax.random.key(0), x[:2])["params"]
    (clean, eps, control), state = router.apply({"params": params}, x, False, mutable=["intermediates"],
                                                rngs={"router_noise": jax.random.key(1), "gate_w": jax.random.key(2)})
    w_noise = np.asarray(state["intermediates"]["w_noise"][0], np.float64)
    m = w_noise.size
    assert abs(w_noise.std() / 0.02 - 1) < 5 / np.sqrt(2 * m)
    expect = np.log1p(np.exp(rows.astype(np.float64) @ w_noise)) + 0.01               # [2, E]
    noise = np.asarray(eps * control, np.float64).reshape(2, n, e)
    for t in range(2):
        np.testing.assert_allclose(np.asarray(control).reshape(2, n, e)[t], np.broadcast_to(expect[t], (n, e)),
                                   rtol=1e-5)
        assert np.all(np.abs(noise[t].std(0, ddof=1) / expect[t] - 1) < 5 / np.sqrt(2 * n))
        assert np.all(np.abs(noise[t].mean(0)) < 5 * expect[t] / np.sqrt(n))
    assert np.abs(expect[0] - expect[1]).max() > 10 * expect.max() / np.sqrt(2 * n)  # token-dependent
    clean_eval, none_eps, none_c = router.apply({"params": params}, x, True)
    assert none_eps is None and none_c is None
    np.testing.assert_array_equal(clean_eval, clean)


# ------------------------------------------------------------------ the engine

def _llama(router="noisy_topk", n_experts=2, top_k=2, n_layer=2, dtype="float32"):
    return LlamaConfig(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=n_layer, n_head=2, n_kv_head=1,
                       intermediate_size=24, attn_lora=LoRAConfig(rank=2), dtype=dtype,
                       moe=MoEConfig(n_experts=n_experts, n_generalists=1, top_k=top_k, router=router,
                                     lora=LoRAConfig(rank=2)))


def test_router_leaves_and_no_noise_leaf():
    cfg = _llama(n_experts=3)
    flat = traverse_util.flatten_dict(init_params(cfg, jax.random.key(0)))
    routers = {p: v.shape for p, v in flat.items() if role_of(p) == "router"}
    assert routers == {("layers", "router", "w_gate", "kernel"): (2, 16, 3),
                       ("layers", "router", "w_mix", "kernel"): (2, 3, 3)}
    assert not [p for p in flat if "noise" in "/".join(p)]  # W_noise is no leaf: never trained or sent
    assert configure_model(_llama(), get_method("comigs")).moe.router == "noisy_topk"
    assert configure_model(_llama(), get_method("pfedmoe")).moe.router == "noisy_topk"
    assert configure_model(_llama(), get_method("fedavg")).moe.router == "uniform"
    assert configure_model(_llama(), get_method("comigs_user_router")).moe.router == "user"


def test_loss_sums_the_layers_balance_and_noise_only_in_training():
    cfg = _llama(n_experts=4, top_k=2)
    params = random_like(init_params(cfg, jax.random.key(0)), 0.3, 0)
    base, trainable = split_base(params)
    windows = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (3, 9)))
    mask = jnp.ones((4,), bool)
    assert _needs_dropout_key(cfg)
    _, m_eval = lm_loss(trainable, base, windows, mask, cfg, 0.01)
    _, m_eval2 = lm_loss(trainable, base, windows, mask, cfg, 0.01)
    loss_a, m_a = lm_loss(trainable, base, windows, mask, cfg, 0.01, jax.random.key(1))
    loss_b, m_b = lm_loss(trainable, base, windows, mask, cfg, 0.01, jax.random.key(2))
    assert float(m_eval["loss"]) == float(m_eval2["loss"])
    assert float(m_a["ce"]) != float(m_b["ce"]) and float(m_a["ce"]) != float(m_eval["ce"])
    _, aux = language_model(cfg).apply({"params": params}, windows[:, :-1], mask, deterministic=False,
                                       return_hidden=True, rngs={"dropout": jax.random.key(1),
                                                                 "router_noise": jax.random.fold_in(jax.random.key(1), 1),
                                                                 "gate_w": jax.random.key(noisy_gate.W_NOISE_SEED)})
    assert aux["lb"].shape == (2,) and float(aux["lb"].min()) > 0
    np.testing.assert_allclose(m_a["lb"], aux["lb"].sum(), rtol=1e-6)
    np.testing.assert_allclose(loss_a, m_a["ce"] + 0.01 * aux["lb"].sum(), rtol=1e-6)


def test_refused_in_one_line():
    with pytest.raises(ValueError, match="Llama family only"):
        dataclasses.replace(tiny_cfg(), moe=MoEConfig(router="noisy_topk", lora=LoRAConfig(rank=2)))
    cfg = base_config.get_config("comigs")
    cfg.model.router_kind = "noisy_topk"
    cfg.base = "pretrain"
    with pytest.raises(ConfigError, match="GPT-2 base"):
        configuration.validate(cfg)
    cfg.base = "smollm2-135m"
    configuration.validate(cfg)
    cfg.model.expert_counts = "2,2,2,2"
    with pytest.raises(ConfigError, match="expert_counts"):
        configuration.validate(cfg)
    cfg.model.expert_counts = ""
    cfg.model.router_kind = "noisy"
    with pytest.raises(ConfigError, match="router_kind"):
        configuration.validate(cfg)


def test_comigs_trains_with_the_noisy_router():
    """A CoMiGS round with a router phase: routers move only there, stay local; losses finite."""
    cfg = configure_model(_llama(n_layer=1), get_method("comigs"))
    base = split_base(init_params(cfg, jax.random.key(0)))[0]
    train, valid = markov_users(2, 400, 0), markov_users(2, 200, 100)
    tc = TrainConfig(rounds=1, local_steps=4, batch_size=4, seq_len=8, router_every=4, router_steps=2)
    sim = Simulation(cfg, tc, get_method("comigs"), base, train, valid, seed=0)
    flat = lambda: {k: np.asarray(v) for k, v in traverse_util.flatten_dict(sim.states.params).items()}
    p0 = flat()
    m = sim.run_round()
    assert np.all(m["router_phase"][:, -1]) and np.all(np.isfinite(m["loss"]))
    p1 = flat()
    moved = {k for k in p0 if not np.array_equal(p0[k], p1[k])}
    assert ("layers", "router", "w_gate", "kernel") in moved and ("layers", "router", "w_mix", "kernel") in moved
