"""experiments.bench on the tiny config at U = 2: the four modes compare like with like; its
command line is experiments.run's (in-process: bench.main(argv) returns the exit code)."""
import json
import os

import numpy as np
import pytest

from comigs_jax import capacity, configuration
from configs import capacity as capacity_config
from configs.bench import get_config
from experiments import bench

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_tiny_u2_all_modes_agree(tmp_path, capsys):
    # Through the command line, in-process: --config=FILE and --config.key=value overrides,
    # top-level and in a workload's model / train groups (configs/base.py's keys).
    argv = ["experiments.bench", f"--config={os.path.join(REPO, 'configs', 'bench.py')}", "--config.models=tiny",
            "--config.users=2", f"--config.out_dir={tmp_path}", "--config.repeats=1", "--config.min_repeats=1",
            "--config.matmul_size=512", "--config.tiny.train.batch_size=2", "--config.tiny.model.rank=8",
            # smaller than the default tiny workload, to keep the test fast
            "--config.tiny.pretrain.n_layer=1", "--config.tiny.train.seq_len=64",
            "--config.tiny.train_tokens=2048", "--config.tiny.valid_tokens=1024"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "| tiny | 2 | vmap_sharded | 2 |" in out and out.count("| tiny | 2 | vmap |") == 1

    result = json.load(open(os.path.join(tmp_path, "bench.json")))
    assert result["config"]["users"] == "2" and result["config"]["tiny"]["train"]["batch_size"] == 2
    assert result["machine"]["command"] == " ".join(["python -m experiments.bench", *argv[1:]])
    rows = result["rows"]
    assert [r["mode"] for r in rows] == list(bench.MODES)
    assert all("round_s" in r for r in rows), rows
    losses = np.array([r["first_round_mean_loss"] for r in rows])
    assert np.all(np.isfinite(losses)) and np.ptp(losses) < 1e-5, losses
    for r in rows:
        assert r["losses_agree"] and r["loss_max_abs_diff"] < 1e-5, r
        assert r["tokens_per_s"] > 0 and 0 < r["fraction_of_peak"] and r["compile_s"] >= 0
        assert r["peak_rss_gib"] > 0
    by_mode = {r["mode"]: r for r in rows}
    assert by_mode["vmap_sharded"]["devices"] == 2  # U = 2 users over 2 of the 8 fake devices
    assert by_mode["vmap"]["devices"] == 1
    assert by_mode["loop_step"]["speedup_vs_loop_step"] == 1.0
    tr = get_config().tiny.train  # the FLOPs of a round: U x (expert steps + router steps), per-user costs
    expect = 2 * (tr.local_steps * rows[0]["flops_expert_step"]
                  + tr.local_steps // tr.router_every * tr.router_steps * rows[0]["flops_router_step"])
    assert rows[0]["round_flops"] == expect
    # One FLOP count: bench.json's FLOPs per round are the capacity model's for the same configs
    # (configs/capacity.py:tiny is the bench's tiny workload), times U.
    cap = capacity_config.get_config("tiny")
    cap.pretrain.n_layer, cap.train.seq_len = 1, 64
    model_cfg, tc, method = configuration.engine_configs(cap)
    assert (model_cfg.n_layer, tc.seq_len) == (1, 64)
    assert all(r["round_flops"] == 2 * capacity.round_flops(model_cfg, tc, method)["per_user"] for r in rows)
    assert result["targets"][0]["met"] is True
    assert "capacity.round_flops" in result["flop_convention"]
    md = open(os.path.join(tmp_path, "bench.md")).read()
    assert "| tiny | 2 | vmap_sharded | 2 |" in md and "GFLOP/s" in md


def test_workloads_are_built_as_capacity_builds_them():
    cfg = get_config()
    for name in ("tiny", "gpt2"):
        model_cfg, tc, method = bench.workload_configs(name, cfg[name], "comigs", "float32")
        assert (model_cfg.n_layer, model_cfg.vocab_size, tc.batch_size) == (
            {"tiny": 2, "gpt2": 12}[name], {"tiny": 2048, "gpt2": 50257}[name], {"tiny": 2, "gpt2": 4}[name])
        assert model_cfg.moe.n_experts == 2 and model_cfg.attn_lora.rank == 8 and tc.local_steps == 2
    tiny = bench.workload_configs("tiny", cfg.tiny, "comigs", "float32")
    assert tiny == configuration.engine_configs(capacity_config.get_config("tiny"))
    cfg.tiny.train.local_steps = 3  # not a multiple of router_every: one line, the workload's key
    with pytest.raises(configuration.ConfigError, match=r"^config\.tiny\.train\.local_steps=3 is not allowed"):
        bench.workload_configs("tiny", cfg.tiny, "comigs", "float32")


@pytest.mark.parametrize("flag, names", [
    ("--config.tiny.model.rnak=4", "'tiny.model.rnak'"),       # unknown key in a workload's model group
    ("--config.userz=4", "'userz'"),                           # unknown top-level key
    ("--config.tiny.model.top_k=3", "config.tiny.model.top_k=3"),  # a value the model does not allow
    ("--config.modes=vmap,loop", "config.modes='vmap,loop'"),
])
def test_bench_command_line_errors_are_one_line(flag, names, capsys, tmp_path):
    assert bench.main(["experiments.bench", flag, f"--config.out_dir={tmp_path}"]) == 1
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], err
    assert out == "" and not os.listdir(tmp_path)  # nothing ran, nothing written


def test_targets_report_misses_by_how_much():
    def row(mode, users, tps, model="tiny", frac=0.1):
        return {"model": model, "users": users, "mode": mode, "dtype": "float32", "round_s": 1.0,
                "tokens_per_s": tps, "fraction_of_peak": frac, "peak_rss_gib": 1.0, "losses_agree": True}
    rows = [row("loop_step", 64, 100.0), row("loop_round", 64, 300.0), row("vmap", 64, 400.0),
            row("vmap", 256, 400.0), row("vmap", 2, 1.0, "gpt2", 0.3)]
    t = {x["target"]: x for x in bench.check_targets(rows, "cpu")}
    assert t["tiny U=64: vmap >= 5x loop_step tokens/s"] == {
        "target": "tiny U=64: vmap >= 5x loop_step tokens/s", "value": 4.0, "met": False}
    assert t["tiny U=64: vmap faster than loop_round"]["met"] is True
    assert t["tiny U=256 runs in one process"]["met"] is True
    assert t["CPU GPT-2 124M round >= 50% of matmul peak"]["value"] == 0.3
    assert not t["CPU GPT-2 124M round >= 50% of matmul peak"]["met"]
