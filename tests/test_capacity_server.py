"""The capacity model's server state per row (comigs_jax.capacity.server_state) against the server
state the engine builds: a tiny Simulation's server_state (Simulation._init_server: ranks, the
rule's init, a server optimizer's value and optax state) and DP's round-start copy
(Simulation.run_round's start_program), summed leaf by leaf and divided by the rows. Then the plan
(users per device, format_plan) and the command line with the `server` and `dp` groups."""
import os

import jax
import pytest

from comigs_jax import capacity
from comigs_jax.capacity.measurement import engine_server_bytes
from comigs_jax.capacity.server_state import server_bytes, shared_elements
from comigs_jax.federated import privacy
from comigs_jax.federated.methods import get_method
from comigs_jax.federated.roles import label_params
from comigs_jax.federated.server_optimizer import ServerOptimizer
from comigs_jax.model.config import GPT2Config, LoRAConfig, MoEConfig
from comigs_jax.train.state import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
U = 3
TC = TrainConfig(rounds=2, local_steps=2, batch_size=2, seq_len=8)
ADAM, MOMENTUM = ServerOptimizer("adam"), ServerOptimizer("sgd", momentum=0.9)

CASES = {  # method, server optimizer, DP
    "mean+adam": ("fedavg", ADAM, False),
    "comigs mean+sgd momentum": ("comigs", MOMENTUM, False),
    "flexlora+adam": ("flexlora", ADAM, False),
    "dp+none": ("fedavg", None, True),
    "hetlora, no optimizer": ("hetlora", None, False),
    "sgd without momentum": ("fedavg", ServerOptimizer("sgd"), False),
}


def _engine_per_row(method, opt, dp):
    """Bytes per row of what a tiny Simulation holds for its server, and the Simulation."""
    from comigs_jax.experiment import programs
    from comigs_jax.experiment.simulation import Simulation
    from tiny import markov_users, tiny_base, tiny_cfg
    cfg = tiny_cfg()
    sim = Simulation(cfg, TC, get_method(method), tiny_base(cfg), markov_users(U, 200, 0), markov_users(U, 100, 100),
                     server_optimizer=opt, dp=privacy.DP(q=1.0, n_users=U, rounds=2) if dp else None)
    held = dict(sim.server_state)
    if sim.server.needs_start:  # the copy run_round makes before the round's program and keeps until aggregate
        held["round_start"] = programs.start_program(sim.method, sim.mesh)(sim.states.params)
    total = sum(x.nbytes for x in jax.tree.leaves(held))
    assert total % sim.n_padded == 0
    return total // sim.n_padded, sim


@pytest.mark.parametrize("case", list(CASES))
def test_server_bytes_equal_the_engines_server_state(case):
    method, opt, dp = CASES[case]
    got, sim = _engine_per_row(method, opt, dp)
    model = server_bytes(sim.model_cfg, TC, get_method(method), opt, dp)
    assert model["total"] == got, (case, model, {k: jax.tree.map(lambda x: (x.shape, x.dtype), v)
                                                 for k, v in sim.server_state.items()})
    # the measurement's helper (from shapes, at any row count) builds the same state
    assert engine_server_bytes(sim.model_cfg, TC, get_method(method), sim.n_padded, opt, dp) == got * sim.n_padded


def test_mean_with_adam_is_three_copies_of_the_shared_leaves_by_hand():
    """FedAdam on CoMiGS: the value, m and v of the attention LoRA and the generalists (float32),
    plus the float32 lr: counted from the parameter tree's roles, not the capacity arithmetic."""
    from tiny import tiny_cfg
    from comigs_jax.federated.methods import configure_model
    from comigs_jax.model.gpt2 import param_shapes
    m = get_method("comigs")
    cfg = configure_model(tiny_cfg(), m)
    shapes = param_shapes(cfg)
    shared = sum(x.size for x, role in zip(jax.tree.leaves(shapes), jax.tree.leaves(label_params(shapes)))
                 if role in ("attn", "generalist"))
    assert sum(shared_elements(cfg, m).values()) == shared
    assert server_bytes(cfg, TC, m, ADAM)["total"] == 3 * 4 * shared + 4


def _gpt2():
    lora = LoRAConfig(rank=8)
    return GPT2Config(dtype="bfloat16", attn_lora=lora, moe=MoEConfig(n_experts=2, n_generalists=1, lora=lora))


def test_the_plan_counts_the_server_per_user():
    """No server optimizer, no DP: the plan is today's (no server entry; the state is the
    UserState's). FedAdam: every user's state grows by its value and moments, so fewer users fit
    a chip (train.user_chunk 8: the state dominates what each extra user costs)."""
    cfg, tc, m = _gpt2(), TrainConfig(batch_size=8, local_steps=4, router_every=4, router_steps=1), get_method("comigs")
    kw = dict(train_tokens=8192, valid_tokens=4096, targets=["h100"], user_chunk=8)
    plain, adam = capacity.plan(cfg, tc, m, 10_000, **kw), capacity.plan(cfg, tc, m, 10_000, server_optimizer=ADAM, **kw)
    assert plain["state"] == capacity.state_bytes(cfg, tc, m) and plain["server"]["total"] == 0
    assert "server" not in capacity.format_plan(plain)
    shared = 4 * (442_368 + 737_280)  # GPT-2 124M rank 8: attention LoRA + one generalist (method.md §1.7)
    assert adam["server"]["value"] == shared and adam["server"]["moments"] == 2 * shared
    assert adam["per_user"]["state"] == plain["per_user"]["state"] + 3 * shared + 4
    (r0,), (r1,) = plain["targets"], adam["targets"]
    room = capacity.TARGETS["h100"].memory_bytes * capacity.USABLE_FRACTION - adam["shared"]["total"]
    assert r1["users_per_device"] == capacity.users_per_device(room, adam["per_user"], 8) < r0["users_per_device"]
    out = capacity.format_plan(adam)
    assert ", server.optimizer adam" in out.splitlines()[0]
    assert "| state: server value (the server optimizer's) | 4.50 MiB |" in out
    assert "| state: server optimizer state (optax) | 9.00 MiB |" in out


def test_command_line_server_and_dp_keys(capsys):
    tiny = f"--config={os.path.join(REPO, 'configs', 'capacity.py')}:tiny"
    assert capacity.main(["comigs_jax.capacity", tiny, "--config.server.optimizer=adam", "--config.targets=h100"]) == 0
    out = capsys.readouterr().out
    assert "server.optimizer adam" in out and "| state: server optimizer state (optax) |" in out
    assert capacity.main(["comigs_jax.capacity", tiny, "--config.method=fedavg", "--config.dp.enabled=True",
                          "--config.targets=h100"]) == 0
    out = capsys.readouterr().out
    assert ", DP" in out.splitlines()[0] and "| state: server round-start copy of the shared leaves (DP) |" in out
    # an experiment config's server group reaches its plan
    assert capacity.main(["comigs_jax.capacity", f"--config={REPO}/configs/demo.py:comigs",
                          "--config.server.optimizer=yogi"]) == 0
    assert "server.optimizer yogi" in capsys.readouterr().out


@pytest.mark.parametrize("flags, names", [
    (["--config.server.optimizer=adamw"], "config.server.optimizer='adamw' is not allowed: none | sgd"),
    (["--config.server.momentum=1.5"], "config.server.momentum=1.5 is not allowed"),
    (["--config.method=local", "--config.server.optimizer=adam"], "config.server.optimizer='adam' is not allowed: "
                                                                  "none for method local"),
    (["--config.method=hetlora", "--config.dp.enabled=True"], "config.dp.enabled=True is not allowed: False for "
                                                              "method hetlora"),
    (["--config.server.optimizr=adam"], "'server.optimizr'"),
])
def test_command_line_server_errors_are_one_line(flags, names, capsys):
    assert capacity.main(["comigs_jax.capacity", *flags]) == 1
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], err
    assert out == ""


DOC_ROWS = {  # docs/scaling.md's table of 10,000 users of GPT-2 124M with train.user_chunk=8
    "CoMiGS, none": [],
    "CoMiGS, sgd momentum 0.9 (FedAvgM)": ["--config.server.optimizer=sgd", "--config.server.momentum=0.9"],
    "CoMiGS, adam (FedAdam)": ["--config.server.optimizer=adam"],
    "FedAvg, DP": ["--config.method=fedavg", "--config.dp.enabled=True"],
    "FlexLoRA, none": ["--config.method=flexlora"],
    "FlexLoRA, adam": ["--config.method=flexlora", "--config.server.optimizer=adam"],
}


def test_the_docs_table_of_server_states_is_the_commands(capsys):
    import re
    with open(os.path.join(REPO, "docs", "scaling.md")) as f:
        doc = f.read()
    for name, flags in DOC_ROWS.items():
        assert capacity.main(["comigs_jax.capacity", "--config.users=10000", "--config.train.user_chunk=8",
                              "--config.targets=h100,h200", *flags]) == 0
        out = capsys.readouterr().out
        resident = re.search(r"every user's state and tokens \(([^)]+) per user\)", out).group(1)
        upd = [re.search(rf"\| {t} [^|]* \| [^|]* \| [^|]* \| (\d+) \|", out).group(1) for t in ("NVIDIA H100", "NVIDIA H200")]
        row = f"| {name} | {resident} | {upd[0]} | {upd[1]} |"
        assert row in doc, row


@pytest.mark.parametrize("faithful", [False, True])
def test_server_bytes_on_a_scanned_llama_every_rule(faithful):
    """A small Llama (layers scanned: [L, slots, ...] leaves; grouped-query attention, SwiGLU's
    three expert matmuls) in both modes (HetLoRA / FlexLoRA as the reference, FFA-LoRA and
    FedSA-LoRA's other shared factors): the arithmetic against the state the engine's own server
    functions build from the parameter shapes (engine_server_bytes, eval_shape)."""
    import dataclasses
    from comigs_jax.federated.methods import configure_model
    from comigs_jax.model.config import LlamaConfig
    lora = LoRAConfig(rank=4)
    base = LlamaConfig(vocab_size=300, n_positions=64, n_embd=48, n_layer=2, n_head=6, n_kv_head=2,
                       intermediate_size=80, head_dim=10, attn_lora=lora,
                       moe=MoEConfig(n_experts=3, n_generalists=1, lora=lora))
    tc = dataclasses.replace(TC, faithful=faithful)
    for name, opt, dp, ranked in [("comigs", ADAM, False, False), ("flexlora", ServerOptimizer("yogi"), False, False),
                                  ("fedavg", None, True, False), ("hetlora", MOMENTUM, False, False),
                                  ("fedsa_lora", ServerOptimizer("adagrad"), False, True),
                                  ("ffa_lora", ADAM, False, False), ("fedavg", ADAM, True, False)]:
        m = get_method(name)
        cfg = configure_model(base, m)
        assert 5 * server_bytes(cfg, tc, m, opt, dp, ranked)["total"] == engine_server_bytes(cfg, tc, m, 5, opt, dp,
                                                                                             ranked), name
