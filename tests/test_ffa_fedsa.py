"""FFA-LoRA (A frozen at the shared init, B trained and averaged) and FedSA-LoRA (A averaged, B
local), clean and as the reference (faithful: D4, D5), through the engine and the aggregation."""
import dataclasses

import jax
import numpy as np
import pytest
from flax import traverse_util

from comigs_jax.experiment.simulation import Simulation
from comigs_jax.federated.aggregate import aggregate
from comigs_jax.federated.communication import shared_params_per_user
from comigs_jax.federated.methods import configure_model, get_method
from comigs_jax.federated.roles import factor_of, role_of
from comigs_jax.train.state import TrainConfig
from tiny import assert_mean_close, markov_users, tiny_base, tiny_cfg

TC = TrainConfig(rounds=1, local_steps=3, batch_size=4, seq_len=8, router_every=3, router_steps=1)


def _flat(tree):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def _same_across_users(x):
    return all(np.array_equal(x[0], x[u]) for u in range(1, len(x)))


@pytest.mark.parametrize("name, faithful", [("ffa_lora", False), ("ffa_lora", True), ("fedsa_lora", False),
                                            ("fedsa_lora", True), ("ffa_lora_77efb25", True)])
def test_factors_train_freeze_and_average_as_the_method_says(name, faithful):
    cfg = tiny_cfg()
    base = tiny_base(cfg)
    train, valid = markov_users(3, 300, 0), markov_users(3, 150, 100)
    sim = Simulation(cfg, dataclasses.replace(TC, faithful=faithful), get_method(name), base, train, valid, seed=1)
    m = sim.method
    assert m is get_method(name).for_mode(faithful)
    init = _flat(sim.states.params)
    sim.run_round()
    trained = _flat(sim.states.params)
    sim.aggregate()
    after = _flat(sim.states.params)
    adam_paths = set(traverse_util.flatten_dict(sim.states.opt_expert[0].mu))  # what the expert AdamW updates
    for k, x0 in init.items():
        role, factor = role_of(k), factor_of(k)
        where = f"{'/'.join(k)} ({role}.{factor})"
        frozen = f"{role}.{factor}" in m.frozen
        if frozen:  # never trains, never leaves the shared init, not in the optimizer
            assert _same_across_users(x0), where
            np.testing.assert_array_equal(after[k], x0, err_msg=where)
            assert k not in adam_paths, where  # no update, no weight decay
            continue
        assert k in adam_paths or role == "router", where
        assert not np.array_equal(trained[k], x0), where  # trained (B starts at 0; A moves)
        if factor in m.shared_factors:  # averaged: identical after aggregation, the mean of the trained
            assert _same_across_users(after[k]), where
            assert_mean_close(after[k][0], trained[k], np.ones(len(trained[k])), err_msg=where)
        else:  # local: aggregation leaves it as trained, and users differ
            np.testing.assert_array_equal(after[k], trained[k], err_msg=where)
            assert not _same_across_users(after[k]), where
    if name == "ffa_lora":
        attn_a = [k for k in init if role_of(k) == "attn" and factor_of(k) == "A"]
        assert attn_a and ("attn.A" in m.frozen) != faithful  # D4: the reference trains attention A
    elif name == "ffa_lora_77efb25":  # 77efb25's -as ffalora = expert_0; every role shared here: FedAvg
        assert (m.frozen, m.shared_factors) == ((), ("A", "B"))
    else:
        assert m.shared_factors == (("A", "B") if faithful else ("A",))  # D5: B averaged too (FedAvg)


def test_aggregate_factors_and_frozen_leaves_against_numpy():
    rng = np.random.default_rng(0)
    tree = {"h_0": {"attn": {"c_attn": {"lora_A": rng.standard_normal((3, 4, 2)), "lora_B": rng.standard_normal((3, 2, 4))}},
                    "mlp": {"generalists": {"fc_A": rng.standard_normal((3, 1, 4, 2)),
                                            "fc_B": rng.standard_normal((3, 1, 2, 4))}}}}
    tree = jax.tree.map(lambda x: x.astype(np.float32), tree)
    w = np.array([1.0, 2.0, 1.0], np.float32)
    out = _flat(aggregate(tree, w, ("attn", "generalist"), shared_factors=("A",)))
    src = _flat(tree)
    for k, x in src.items():
        if factor_of(k) == "A":
            assert_mean_close(out[k], x, w, err_msg=str(k))
        else:
            np.testing.assert_array_equal(out[k], x, err_msg=str(k))
    out = _flat(aggregate(tree, w, ("attn", "generalist"), shared_factors=("B",), frozen=("attn.A", "generalist.A")))
    for k, x in src.items():
        if factor_of(k) == "B":
            assert_mean_close(out[k], x, w, err_msg=str(k))
        else:
            np.testing.assert_array_equal(out[k], x, err_msg=str(k))


def test_communication_counts_the_shared_factor_only():
    cfg = tiny_cfg()
    ab = {}
    for name in ("fedavg", "ffa_lora", "fedsa_lora"):
        m = get_method(name)
        ab[name] = int(shared_params_per_user(configure_model(cfg, m), m, [2, 2])[0])
    mc = configure_model(cfg, get_method("fedavg"))
    from comigs_jax.model.lm import param_shapes
    sizes = {"A": 0, "B": 0}
    for k, s in traverse_util.flatten_dict(param_shapes(mc)).items():
        if factor_of(k) is not None:
            sizes[factor_of(k)] += int(np.prod(s.shape))
    assert ab["fedavg"] == sizes["A"] + sizes["B"]
    assert ab["ffa_lora"] == sizes["B"] and ab["fedsa_lora"] == sizes["A"]
