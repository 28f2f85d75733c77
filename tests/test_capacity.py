"""The capacity model (comigs_jax.capacity) against the shapes and the compiled round program.

Compile only, nothing runs: the bench's tiny config (2 layers, width 128, vocabulary 2048,
sequence 128, batch 2, 1 generalist + 1 specialist, rank 8) at U = 16 and U = 64 on CPU.
"""
import jax
import pytest

from comigs_jax import capacity
from comigs_jax.federated.methods import configure_model, get_method
from comigs_jax.federated.roles import label_params
from comigs_jax.model.config import GPT2Config, LoRAConfig, MoEConfig
from comigs_jax.model.gpt2 import param_shapes
from comigs_jax.train.state import TrainConfig

# The LLVM optimisation level changes compile time, not XLA's buffer assignment.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def tiny(dtype="float32"):
    lora = LoRAConfig(rank=8)
    cfg = GPT2Config(vocab_size=2048, n_positions=128, n_embd=128, n_layer=2, n_head=4, dtype=dtype, attn_lora=lora,
                     moe=MoEConfig(n_experts=2, n_generalists=1, top_k=2, lora=lora))
    method = get_method("comigs")
    tc = TrainConfig(rounds=1000, local_steps=2, batch_size=2, seq_len=128, router_every=2, router_steps=1)
    return configure_model(cfg, method), tc, method


def test_param_counts_match_the_parameter_tree():
    cfg, _, _ = tiny()
    shapes = param_shapes(cfg)
    counts = {}
    for leaf, role in zip(jax.tree.leaves(shapes), jax.tree.leaves(label_params(shapes))):
        counts[role] = counts.get(role, 0) + leaf.size
    got = capacity.param_counts(cfg)
    for role in ("base", "attn", "generalist", "specialist", "router"):
        assert got[role] == counts[role], role
    # method.md §1.7: GPT-2 124M, 1G1S, rank 8
    lora = LoRAConfig(rank=8)
    gpt2 = GPT2Config(attn_lora=lora, moe=MoEConfig(n_experts=2, n_generalists=1, lora=lora))
    p = capacity.param_counts(gpt2)
    assert p["trainable"] == 1_935_360 and p["attn"] + p["generalist"] == 1_179_648
    assert p["base"] == 124_439_808


def test_state_bytes_match_init_states():
    cfg, tc, method = tiny()
    from comigs_jax.train.state import init_states
    states = jax.eval_shape(lambda k: init_states(cfg, tc, method, k, 1, 1), jax.random.key(0))
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(states))
    assert capacity.state_bytes(cfg, tc, method)["total"] == nbytes


def test_per_user_bytes_within_25_percent_of_compiled_program():
    cfg, tc, method = tiny()
    m = capacity.measure(cfg, tc, method, (16, 64), profile="cpu", train_tokens=8192, valid_tokens=4096,
                         compiler_options=FAST)
    assert 0.75 <= m["ratio_marginal"] <= 1.25, m
    for u in (16, 64):
        assert 0.75 <= m["per_u"][u]["ratio"] <= 1.25, (u, m)


def test_plan_gpt2_1000_users():
    lora = LoRAConfig(rank=8)
    cfg = GPT2Config(dtype="bfloat16", attn_lora=lora, moe=MoEConfig(n_experts=2, n_generalists=1, lora=lora))
    p = capacity.plan(cfg, TrainConfig(), get_method("comigs"), 1000)
    rows = {r["target"]: r for r in p["targets"]}
    assert set(rows) == set(capacity.TARGETS)
    for r in rows.values():
        if r["devices"]:
            assert r["devices"] * r["users_per_device"] >= 1000
            assert r["round_seconds"] > 0
    # the step (activations) dominates a user's bytes for GPT-2 at batch 64 x 128
    assert p["per_user"]["step"] > 100 * p["per_user"]["state"]
    assert "H100" in capacity.format_plan(p)
    with pytest.raises(ValueError):
        capacity.activation_tensors(cfg, 64, 128, profile="tpu")
