"""Study d's per-user router (MoEConfig router="user", method comigs_user_router): one learned
logit vector [E] per layer and user, the same expert weights for every token."""
import dataclasses

import jax
import numpy as np
import pytest
from flax import traverse_util

from comigs_jax.experiment.simulation import Simulation
from comigs_jax.federated.methods import configure_model, get_method
from comigs_jax.federated.roles import label_params, role_of, split_base
from comigs_jax.model.config import LlamaConfig, LoRAConfig, MoEConfig
from comigs_jax.model.lm import param_shapes, token_gate_weights
from comigs_jax.train.state import TrainConfig
from tiny import VOCAB, markov_users, tiny_base, tiny_cfg


def np_gate(z, mask, k):
    """method.md §1.5 in NumPy for one logit vector z [E]."""
    z = np.where(mask, z.astype(np.float64), -np.inf)
    if k == 1:
        p = np.exp(z - z.max()); p /= p.sum()
        return np.where(np.arange(len(z)) == p.argmax(), p.max(), 0.0)
    top = np.argsort(-z, kind="stable")[:min(k, len(z))]
    w = np.zeros(len(z))
    e = np.exp(z[top] - z[top].max())
    w[top] = e / e.sum()
    return w


def _cfg(family, moe):
    if family == "gpt2":
        return dataclasses.replace(tiny_cfg(n_layer=2), moe=moe)
    return LlamaConfig(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2, n_kv_head=1,
                       intermediate_size=24, attn_lora=LoRAConfig(rank=2), moe=moe)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("n_experts,k,mask", [(4, 2, [1, 1, 0, 1]), (3, 1, [1, 1, 1])])
def test_weights_are_the_gate_of_one_learned_vector_for_every_token(family, n_experts, k, mask):
    cfg = _cfg(family, MoEConfig(n_experts=n_experts, n_generalists=1, top_k=k, router="user",
                                 lora=LoRAConfig(rank=2)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.5 * rng.standard_normal(s.shape)).astype(np.float32), param_shapes(cfg))
    flat = traverse_util.flatten_dict(params)
    routers = {p: v for p, v in flat.items() if "router" in p}
    assert all(p[-1] == "logits" and role_of(p) == "router" for p in routers)
    # one [E] vector per layer: GPT-2 h_i/router/logits, Llama's scanned layers/router/logits [L, E]
    logits = (np.stack([flat[(f"h_{i}", "router", "logits")] for i in range(2)]) if family == "gpt2"
              else flat[("layers", "router", "logits")])
    assert logits.shape == (2, n_experts) and len(routers) == (2 if family == "gpt2" else 1)
    tokens = rng.integers(0, VOCAB, (2, 7))
    m = np.asarray(mask, bool)
    w = np.asarray(token_gate_weights(cfg, params, tokens, m))                 # [L, B, T, E]
    for layer in range(2):
        expect = np_gate(logits[layer], m, k)
        np.testing.assert_allclose(w[layer], np.broadcast_to(expect, w[layer].shape), rtol=1e-6, atol=1e-7)
    assert np.all(w[..., ~m] == 0)


def test_roles_and_parameter_count():
    cfg = _cfg("gpt2", MoEConfig(n_experts=3, router="user", lora=LoRAConfig(rank=2)))
    labels = traverse_util.flatten_dict(label_params(param_shapes(cfg)))
    assert {p for p, r in labels.items() if r == "router"} == {(f"h_{i}", "router", "logits") for i in range(2)}
    from comigs_jax.capacity import param_counts
    assert param_counts(cfg)["router"] == 2 * 3
    assert configure_model(tiny_cfg(), get_method("comigs_user_router")).moe.router == "user"
    assert configure_model(tiny_cfg(), get_method("comigs")).moe.router == "learned"


def test_router_vector_trains_only_in_router_phases_and_stays_local():
    """Expert steps leave the router vector as it was; the router phase (validation loss) moves it;
    aggregation leaves it per user."""
    cfg = tiny_cfg()
    base = tiny_base(cfg)
    train, valid = markov_users(2, 400, 0), markov_users(2, 200, 100)
    tc = TrainConfig(rounds=2, local_steps=2, batch_size=4, seq_len=8, router_every=4, router_steps=2)
    sim = Simulation(cfg, tc, get_method("comigs_user_router"), base, train, valid, seed=0)
    flat = lambda: {k: np.asarray(v) for k, v in traverse_util.flatten_dict(sim.states.params).items()}
    p0 = flat()
    assert [k for k in p0 if role_of(k) == "router"] == [("h_0", "router", "logits")]
    m = sim.run_round()  # steps 1-2: expert steps only
    assert not np.any(m["router_phase"])
    p1 = flat()
    for k in p0:
        assert np.array_equal(p0[k], p1[k]) == (role_of(k) == "router"), k
    m = sim.run_round()  # steps 3-4, router phase after step 4
    assert np.all(m["router_phase"][:, -1])
    p2 = flat()
    key = ("h_0", "router", "logits")
    assert not np.array_equal(p2[key], p1[key])
    sim.aggregate()
    p3 = flat()
    np.testing.assert_array_equal(p3[key], p2[key])  # local: not averaged
    assert not np.allclose(p3[key][0], p3[key][1])
