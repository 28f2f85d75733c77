"""Communication accounting (comigs_jax.federated.communication) against method.md's counts and
direct counts of the parameter tree."""
import jax
import numpy as np
import pytest

from comigs_jax.federated.aggregate import aggregate
from comigs_jax.federated.communication import accounting, shared_params_per_user
from comigs_jax.federated.methods import configure_model, get_method
from comigs_jax.federated.roles import split_base
from comigs_jax.model.config import GPT2Config, LlamaConfig, LoRAConfig, MoEConfig
from comigs_jax.model.lm import param_shapes

GPT2_1G1S = GPT2Config(attn_lora=LoRAConfig(rank=8),
                       moe=MoEConfig(n_experts=2, n_generalists=1, top_k=2, lora=LoRAConfig(rank=8)))


def test_gpt2_counts_are_the_references():
    """method.md §1.7, GPT-2 124M 1G1S at r = 8: attention + expert 0 = 1,179,648 per round;
    both experts shared (FedAvg, 2G) = 1,916,928 (the reference's FedAvg router, Q5, aside)."""
    per = lambda m: shared_params_per_user(configure_model(GPT2_1G1S, get_method(m)), get_method(m), [2, 2])
    assert per("comigs").tolist() == per("pfedmoe").tolist() == [1_179_648] * 2
    assert per("fedavg").tolist() == per("comigs_2g").tolist() == [1_916_928] * 2


def test_counts_are_what_aggregate_replaces():
    """Llama (scanned leaves [L, slots, ...]), 1 generalist + up to 3 specialists, users with 2, 3
    and 4 experts: a user's count is the number of its parameters that `aggregate` replaces by the
    mean (random leaves: every averaged entry changes), specialists shared or not."""
    cfg = LlamaConfig(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=4, n_kv_head=2,
                      intermediate_size=24, attn_lora=LoRAConfig(rank=2),
                      moe=MoEConfig(n_experts=4, n_generalists=1, top_k=2, lora=LoRAConfig(rank=3)))
    counts = [2, 3, 4]
    rng = np.random.default_rng(0)
    for name in ("fedavg_moe", "comigs"):
        m = get_method(name)
        mc = configure_model(cfg, m)
        trainable = split_base(param_shapes(mc))[1]
        stacked = jax.tree.map(lambda s: rng.standard_normal((3, *s.shape)).astype(np.float32), trainable)
        out = aggregate(stacked, np.ones(3, np.float32), m.shared_roles, n_shared_specialists=min(counts) - 1)
        changed = sum(np.sum(np.asarray(o)[0] != x[0]) for o, x in zip(jax.tree.leaves(out), jax.tree.leaves(stacked)))
        got = shared_params_per_user(mc, m, counts)
        assert got.tolist() == [int(changed)] * 3, name
    with pytest.raises(ValueError, match=r"expert_counts=\[5\]: each in \[max\(1, n_generalists=1\), n_experts=4\]"):
        shared_params_per_user(mc, m, [5])


def test_bytes_follow_participation_and_one_round_methods():
    counts = [2, 2, 2]
    taken = [4, 2, 3]  # rounds each user trained in, of 4 (participation < 1)
    for name in ("comigs", "local", "centralized"):
        m = get_method(name)
        a = accounting(configure_model(GPT2_1G1S, m), m, counts, 4, taken)
        if m.pooled_data:
            assert a["per_round_params"] is None
            continue
        p = np.asarray(a["per_round_params"])
        up = np.zeros(3) if m.one_round else np.asarray(taken)
        down = 0 if m.one_round else 4
        np.testing.assert_array_equal(a["upload_bytes_float32"], p * up * 4)
        np.testing.assert_array_equal(a["upload_bytes_bfloat16"], p * up * 2)
        np.testing.assert_array_equal(a["download_bytes_float32"], p * down * 4)
        assert a["download_rounds"] == [down] * 3
