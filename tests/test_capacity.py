"""The capacity model (comigs_jax.capacity) against the shapes and the compiled round program.

Compile only, nothing runs: the bench's tiny config (2 layers, width 128, vocabulary 2048,
sequence 128, batch 2, 1 generalist + 1 specialist, rank 8; configs/capacity.py:tiny) at U = 16
and U = 64 on CPU. The command line (capacity.main(argv), in-process) as experiments.run's.
"""
import os

import jax
import pytest

from comigs_jax import capacity, configuration
from configs import capacity as capacity_config
from comigs_jax.federated.methods import configure_model, get_method
from comigs_jax.federated.roles import label_params
from comigs_jax.model.config import REMAT, GPT2Config, LoRAConfig, MoEConfig
from comigs_jax.model.gpt2 import param_shapes
from comigs_jax.train.state import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def test_state_bytes_of_a_float64_model_match_its_init_states(x64):
    """A float64 model (64-bit JAX) keeps its trainable leaves, AdamW moments and faithful leaks in
    float64: 8 bytes each, not 4."""
    import dataclasses
    from comigs_jax.train.state import init_states
    cfg, tc, method = tiny("float64")
    tc = dataclasses.replace(tc, faithful=True)
    states = jax.eval_shape(lambda k: init_states(cfg, tc, method, k, 1, 1), jax.random.key(0))
    assert jax.tree.leaves(states.params)[0].dtype == jax.numpy.float64
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(states))
    assert capacity.state_bytes(cfg, tc, method)["total"] == nbytes


def test_chunked_round_bytes_within_25_percent_of_compiled_program():
    """train.user_chunk = 4 at U = 10 (padded to 12 rows: 3 chunks) and U = 32 (8 chunks): the
    device holds every row's state and tokens (the arguments) and the activations of 4 users (the
    temporaries); the model's total, its arguments and its activations against XLA's. With FedAdam:
    the server's state per row (value, m, v, lr: not an argument of the round program, held beside
    it) is the engine's at every U (engine_server_bytes, from the shapes the server builds)."""
    from comigs_jax.federated.server_optimizer import ServerOptimizer
    cfg, tc, method = tiny()
    server = {"server_optimizer": ServerOptimizer("adam")}
    m = capacity.measure(cfg, tc, method, (10, 32), profile="cpu", user_chunk=4, train_tokens=8192,
                         valid_tokens=4096, compiler_options=FAST, server=server)
    assert m["model_server"] == 3 * 4 * (capacity.param_counts(cfg)["attn"] + capacity.param_counts(cfg)["generalist"]) + 4
    for u, rows in ((10, 12), (32, 32)):
        q, c = m["per_u"][u], m["compiled"][u]
        assert (q["rows"], q["live"], c["rows"], c["chunk"]) == (rows, 4, rows, 4), (u, q, c)
        assert c["server_state"] == rows * m["model_server"], (u, c)
        assert 0.75 <= q["ratio"] <= 1.25, (u, m)                     # the device's total
        assert 0.9 <= q["arguments_ratio"] <= 1.1, (u, m)             # state + tokens of every row, the base
        assert 0.75 <= q["activations_ratio"] <= 1.25, (u, m)         # 4 users' working set
    # The marginal row costs its state and tokens, not its activations (those of 4 users only).
    assert m["model_per_user"] == m["model_state"] + m["model_tokens"]
    assert m["marginal_per_user"] < 0.1 * m["model_step"], m


def test_device_rows_are_the_layouts():
    """capacity.device_rows (arithmetic) lays users out as federated.layout.Layout does."""
    from comigs_jax.federated.layout import Layout
    from comigs_jax.federated.sharding import users_mesh
    for n_users, devices, chunk in [(10, 1, 4), (32, 1, 4), (12, 8, 0), (12, 8, 1), (100, 8, 4), (9, 2, 16),
                                    (4096, 8, 64), (7, 4, 2)]:
        layout = Layout(n_users, users_mesh(jax.devices()[:devices]), chunk=chunk)
        r = capacity.device_rows(n_users, devices, chunk)
        assert (r["rows"] * devices, r["chunk"]) == (layout.n_rows, layout.model_chunk), (n_users, devices, chunk)
        assert r["live"] == (r["chunk"] or r["rows"])


def test_chunks_and_remat_in_the_plan():
    """Chunked, a device holds every user's state but one chunk's activations: far more users per
    chip; remat (accelerator profile) keeps less; the CPU profile ignores it (XLA:CPU undoes
    jax.checkpoint, docs/scaling.md)."""
    import dataclasses
    lora = LoRAConfig(rank=8)
    cfg = GPT2Config(dtype="bfloat16", attn_lora=lora, moe=MoEConfig(n_experts=2, n_generalists=1, lora=lora))
    tc, method = TrainConfig(batch_size=8, local_steps=4, router_every=4, router_steps=1), get_method("comigs")
    kw = dict(train_tokens=8192, valid_tokens=4096, targets=["h200"])
    kept = {}
    for remat in REMAT:
        c = dataclasses.replace(cfg, remat=remat)
        kept[remat] = capacity.plan(c, tc, method, 1000, **kw)["step"]["activations_kept"]
        cpu = capacity.plan(c, tc, method, 1000, profile="cpu", **kw)["step"]["activations_kept"]
        assert cpu == capacity.plan(cfg, tc, method, 1000, profile="cpu", **kw)["step"]["activations_kept"]
    assert kept["block"] < kept["moe"] < kept["none"]
    # block: each block's input [N, d] plus the head; one block is recomputed at a time (transient)
    n, d = 8 * 128, 768
    assert kept["block"] < 12 * n * d * 2 + 10 * n * d * 4
    p0, p8 = capacity.plan(cfg, tc, method, 1000, **kw), capacity.plan(cfg, tc, method, 1000, user_chunk=8, **kw)
    pu = p8["per_user"]
    (r0,), (r8,) = p0["targets"], p8["targets"]
    room = capacity.TARGETS["h200"].memory_bytes * capacity.USABLE_FRACTION - p8["shared"]["total"]
    assert r0["users_per_device"] == int(room // pu["total"])
    assert r8["users_per_device"] == int((room - 8 * pu["step"]) // (pu["state"] + pu["tokens"])) // 8 * 8
    assert r8["users_per_device"] >= 1000 and r8["devices"] == 1 and r8["users_per_device"] > 10 * r0["users_per_device"]
    assert "user_chunk 8" in capacity.format_plan(p8)
    assert "remat 'block'" in capacity.format_plan(capacity.plan(dataclasses.replace(cfg, remat="block"), tc, method, 8))
    # A chunk larger than what fits falls back to all at once.
    assert capacity.users_per_device(10 * pu["total"], pu, 64) == 10


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


# ----------------------------------------------------------------------------- command line

def test_capacity_default_plan_is_the_issue_example(capsys):
    """`python -m comigs_jax.capacity` with no flags: 1,000 users of GPT-2 124M, 1G + 1S, rank 8,
    64 x 128 windows, bf16, the reference schedule (the argparse defaults it replaced)."""
    assert capacity.main(["comigs_jax.capacity"]) == 0
    out = capsys.readouterr().out
    lora = LoRAConfig(rank=8)
    cfg = GPT2Config(dtype="bfloat16", attn_lora=lora, moe=MoEConfig(n_experts=2, n_generalists=1, lora=lora))
    assert out == capacity.format_plan(capacity.plan(cfg, TrainConfig(), get_method("comigs"), 1000))
    assert "| NVIDIA H100 SXM 80 GB | 79.65 GiB | 989 TFLOP/s | 16 | 63 | 2.6 s |" in out  # docs/scaling.md
    assert "56.35 TFLOP per user" in out


def test_capacity_config_file_and_overrides(capsys):
    argv = ["comigs_jax.capacity", f"--config={os.path.join(REPO, 'configs', 'capacity.py')}:tiny",
            "--config.users=64", "--config.train.batch_size=4", "--config.model.n_experts=4", "--config.targets=h100"]
    assert capacity.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Capacity plan: 64 users, GPT-2 2L x 128 (V 2,048), comigs (1G + 3S), batch 4 x 128, "
                          "float32, remat 'none', user_chunk 0, activation profile 'cpu'")
    assert "H100" in out and "H200" not in out
    # the preset is the bench's tiny workload, the config of the tests above
    model_cfg, tc, method = configuration.engine_configs(capacity_config.get_config("tiny"))
    cfg, tc_ref, _ = tiny()
    assert model_cfg == cfg and method.name == "comigs"
    assert [getattr(tc, k) for k in ("local_steps", "batch_size", "seq_len", "router_every", "router_steps")] == \
        [getattr(tc_ref, k) for k in ("local_steps", "batch_size", "seq_len", "router_every", "router_steps")]


@pytest.mark.parametrize("flag, names", [
    ("--config.model.rnak=4", "'model.rnak'"),             # unknown key in configs/base.py's model group
    ("--config.user=4", "'user'"),                         # unknown top-level key
    ("--config.users=many", "--config.users"),             # a value the flag parser refuses
    ("--config.base=gpt3", "config.base='gpt3'"),          # a value the builder refuses
    ("--config.measure=16", "config.measure='16'"),
    ("--config.model.remat=all", "config.model.remat='all' is not allowed: none | block | moe"),
    ("--config.train.user_chunk=-1", "config.train.user_chunk=-1"),
])
def test_capacity_command_line_errors_are_one_line(flag, names, capsys):
    assert capacity.main(["comigs_jax.capacity", flag]) == 1
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], err
    assert out == ""
