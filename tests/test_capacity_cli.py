"""`python -m comigs_jax.capacity --config=<an experiment config>` plans that config's runs: its
users, its base's shape, its model, batch and schedule, its tokens per user (in-process:
capacity.main(argv) returns the exit code; a subprocess only for the command's own stderr line).
The expected plans are built here from the run's own config functions, not from the command's."""
import dataclasses
import os
import subprocess
import sys

import pytest

from comigs_jax import capacity, configuration
from comigs_jax.federated.methods import configure_model, get_method
from comigs_jax.model.config import LLAMA_SIZES, GPT2Config, LlamaConfig
from configs import capacity as capacity_config, demo, slimpajama

from procenv import env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def expected_plan(cfg, base_cfg, method: str, n_users: int, batch_scale: int = 1) -> str:
    """The plan of a run of experiment config `cfg` on `base_cfg`, as experiments.run builds it."""
    m = get_method(method)
    model_cfg = configure_model(configuration.model_config(cfg, base_cfg), m)
    tc = configuration.train_config(cfg)
    tc = dataclasses.replace(tc, batch_size=batch_scale * tc.batch_size)
    return capacity.format_plan(capacity.plan(model_cfg, tc, m, n_users, train_tokens=batch_scale * cfg.data.train_tokens,
                                              valid_tokens=batch_scale * cfg.data.valid_tokens))


def demo_base(cfg) -> GPT2Config:
    """The demo's pretrained base as comigs_jax.experiment.base_model.load_base builds it."""
    p = cfg.pretrain
    return GPT2Config(vocab_size=cfg.data.synthetic.vocab_size, n_positions=cfg.train.seq_len, n_embd=p.n_embd,
                      n_layer=p.n_layer, n_head=p.n_head)


def test_the_demo_config_is_planned(capsys):
    """The issue's traceback (`AttributeError: 'users'`): the demo's 4 users of its 2-layer base, one
    plan per method it compares (local, fedavg, comigs)."""
    assert capacity.main(["comigs_jax.capacity", f"--config={REPO}/configs/demo.py"]) == 0
    out = capsys.readouterr().out
    cfg = demo.get_config()
    assert out == "".join(expected_plan(cfg, demo_base(cfg), m, 4) for m in ("local", "fedavg", "comigs"))
    out = expected_plan(cfg, demo_base(cfg), "comigs", 4)
    assert out.startswith("# Capacity plan: 4 users, GPT-2 2L x 128 (V 256), comigs (1G + 1S), batch 16 x 64, float32")
    assert "| tokens (40,000 + 20,000 x 2 B) |" in out


def test_tiny_and_slimpajama_configs_are_planned(capsys):
    assert capacity.main(["comigs_jax.capacity", f"--config={REPO}/configs/tiny.py"]) == 0
    assert capsys.readouterr().out.startswith("# Capacity plan: 3 users, GPT-2 1L x 32 (V 64), comigs (1G + 1S), "
                                              "batch 4 x 16, float32")
    assert capacity.main(["comigs_jax.capacity", f"--config={REPO}/configs/slimpajama.py:fedavg"]) == 0
    cfg = slimpajama.get_config("fedavg")
    gpt2 = GPT2Config()  # GPT-2 124M: 12 x 768, 1,024 positions, vocabulary 50,257
    assert capsys.readouterr().out == expected_plan(cfg, gpt2, "fedavg", 4)


def test_a_llama_base_is_planned(capsys):
    argv = ["comigs_jax.capacity", f"--config={REPO}/configs/slimpajama.py", "--config.base=smollm2-135m"]
    assert capacity.main(argv) == 0
    cfg = slimpajama.get_config()
    cfg.base = "smollm2-135m"
    assert capsys.readouterr().out == expected_plan(cfg, LlamaConfig(**LLAMA_SIZES["smollm2-135m"]), "comigs", 4)


def test_methods_stacked_seeds_centralized_and_expert_counts(capsys):
    """One plan per method; stacked seeds are one program of seeds x users rows; Centralized is one
    pooled model per federation on batch x users windows and every user's tokens; users with
    different expert counts are held at the largest."""
    argv = ["comigs_jax.capacity", f"--config={REPO}/configs/demo.py", "--config.methods=local,centralized",
            "--config.seeds=0,1,2", "--config.federation.stack_seeds=True", "--config.model.expert_counts=2,3,3,3"]
    assert capacity.main(argv) == 0
    out = capsys.readouterr().out
    cfg = demo.get_config()
    cfg.model.n_experts = 3
    local, central = expected_plan(cfg, demo_base(cfg), "local", 12), expected_plan(cfg, demo_base(cfg), "centralized", 3, 4)
    assert out == local + central
    assert local.startswith("# Capacity plan: 12 users, GPT-2 2L x 128 (V 256), local (1G + 2S), batch 16 x 64")
    assert central.startswith("# Capacity plan: 3 users, GPT-2 2L x 128 (V 256), centralized (1G + 2S), batch 64 x 64")
    assert "| tokens (160,000 + 80,000 x 2 B) |" in central


def test_experiment_plans_keep_the_capacity_defaults():
    cfg = demo.get_config("comigs")
    (c,) = capacity.experiment_plans(cfg, capacity_config.get_config())
    assert (c.users, c.method, c.base, c.vocab_size, c.train_tokens, c.valid_tokens) == (4, "comigs", "pretrain", 256,
                                                                                          40_000, 20_000)
    assert (c.targets, c.mfu, c.usable, c.profile, c.measure) == ("h100,h200,tpu-v4,tpu-v5e", 0.35, 0.9,
                                                                  "accelerator", "")
    assert cfg.train.batch_size == 16 and cfg.model.n_experts == 2  # the experiment config is not changed


def _neither(tmp_path):
    p = tmp_path / "neither.py"
    p.write_text("from ml_collections import ConfigDict\n\ndef get_config():\n    c = ConfigDict()\n    c.x = 1\n"
                 "    return c\n")
    return f"--config={p}"


@pytest.mark.parametrize("flags, names", [
    (["--config=configs/demo.py", "--config.base=/no/such/base"], "config.base='/no/such/base' is not allowed"),
    (["--config=configs/demo.py", "--config.data.n_users=0"], "config.data.n_users=0 is not allowed"),
    (["--config=configs/demo.py:comigs", "--config.method=fedavgg"], "config.method='fedavgg' is not allowed"),
    (["--config=configs/demo.py", "--config.methods=local,fedavgg"], "config.methods='fedavgg' is not allowed"),
    (["--config=configs/demo.py", "--config.userz=3"], "the top-level keys are defined in configs/base.py"),
    (["--config=configs/demo.py", "--config.data.n_userz=3"], "are defined in comigs_jax/data/config.py"),
    (["--config.data.n_users=3"], "the top-level keys are defined in configs/capacity.py"),
    ("neither", "neither a capacity config"),
])
def test_experiment_config_errors_are_one_line(flags, names, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    flags = [_neither(tmp_path)] if flags == "neither" else flags
    assert capacity.main(["comigs_jax.capacity", *flags]) == 1
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], err
    assert out == ""


def test_the_command_refuses_in_one_stderr_line():
    """The command's own process: no traceback, one `error:` line, exit code 1."""
    p = subprocess.run([sys.executable, "-m", "comigs_jax.capacity", "--config=configs/demo.py",
                        "--config.base=/no/such/base"], cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stdout == "", (p.stdout, p.stderr)
    assert p.stderr.startswith("error: config.base='/no/such/base' is not allowed") and p.stderr.count("\n") == 1, p.stderr
