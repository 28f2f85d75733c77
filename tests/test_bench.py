"""experiments.bench on the tiny config at U = 2: the four modes compare like with like; its
command line is experiments.run's (in-process: bench.main(argv) returns the exit code)."""
import json
import os

import numpy as np
import pytest

from comigs_jax import capacity, configuration
from comigs_jax.capacity import report, sweep, timing, workload
from configs import capacity as capacity_config
from configs.bench import get_config
from experiments import bench
from tiny import TOL64

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Smaller than the default tiny workload, to keep the tests fast.
SMALL = ["--config.models=tiny", "--config.repeats=1", "--config.min_repeats=1", "--config.matmul_size=512",
         "--config.tiny.pretrain.n_layer=1", "--config.tiny.train.seq_len=64",
         "--config.tiny.train_tokens=2048", "--config.tiny.valid_tokens=1024"]


def test_bench_tiny_u6_chunked_sharded_equals_loop_step(tmp_path, capsys, x64):
    """Through the command line, in-process: --config=FILE and --config.key=value overrides, top-level
    and in a workload's model / train groups (configs/base.py's keys). U = 6 users in chunks of 2,
    remat 'block': `vmap_sharded` runs 3 users on each of 2 devices, padded to 2 chunks each (2
    padding rows, masked), and gives loop_step's losses; the padding rows are neither reported nor
    counted as work. (The one-device chunked vmap is test_bench_sweep's U = 4 row; vmap == loop in
    faithful mode is test_engine's: two modes here keep this test to two round compiles.)"""
    argv = ["experiments.bench", f"--config={os.path.join(REPO, 'configs', 'bench.py')}", *SMALL,
            "--config.users=6", f"--config.out_dir={tmp_path}", "--config.tiny.train.batch_size=2",
            "--config.tiny.model.rank=8", "--config.user_chunk=2", "--config.remat=block",
            "--config.modes=loop_step,vmap_sharded", "--config.dtype=float64"]  # two programs: TOL64
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "| tiny | 6 | vmap_sharded | 2 | 2 (+2 pad) |" in out and "| tiny | 6 | vmap | 1 |" not in out
    assert "model.remat 'block'; train.user_chunk 2" in out

    result = json.load(open(os.path.join(tmp_path, "bench.json")))
    assert result["config"]["users"] == "6" and result["config"]["tiny"]["train"]["batch_size"] == 2
    assert (result["config"]["user_chunk"], result["config"]["remat"]) == (2, "block")
    assert result["machine"]["command"] == " ".join(["python -m experiments.bench", *argv[1:]])
    rows = result["rows"]
    assert [r["mode"] for r in rows] == ["loop_step", "vmap_sharded"]
    assert all("round_s" in r for r in rows), rows
    losses = np.array([r["first_round_mean_loss"] for r in rows])
    assert np.all(np.isfinite(losses)) and np.ptp(losses) < TOL64["atol"], losses
    for r in rows:
        assert r["losses_agree"] and r["loss_max_abs_diff"] < TOL64["atol"], r
        assert r["tokens_per_s"] > 0 and 0 < r["fraction_of_peak"] and r["compile_s"] >= 0
        assert r["peak_rss_gib"] > 0
        assert (r["user_chunk"], r["remat"]) == (2, "block")
    by_mode = {r["mode"]: r for r in rows}
    sh = by_mode["vmap_sharded"]  # 6 users over gcd(6, 8) = 2 of the 8 fake devices, 3 each -> 2 chunks of 2
    assert (sh["devices"], sh["chunk"], sh["padding_rows"]) == (2, 2, 2)
    assert sh["program_memory"]["temp_size_in_bytes"] > 0
    assert by_mode["loop_step"]["chunk"] is None and by_mode["loop_step"]["speedup_vs_loop_step"] == 1.0
    tr = get_config().tiny.train  # the FLOPs of a round: U x (expert steps + router steps), per-user costs
    expect = 6 * (tr.local_steps * rows[0]["flops_expert_step"]
                  + tr.local_steps // tr.router_every * tr.router_steps * rows[0]["flops_router_step"])
    assert all(r["round_flops"] == expect for r in rows)  # 6 users' work, not the 8 rows'
    tokens = 6 * tr.local_steps * tr.batch_size * 64
    assert abs(sh["tokens_per_s"] * sh["round_s"] - tokens) < 1e-6 * tokens
    # One FLOP count: bench.json's FLOPs per round are the capacity model's for the same configs
    # (configs/capacity.py:tiny is the bench's tiny workload), times U.
    cap = capacity_config.get_config("tiny")
    cap.pretrain.n_layer, cap.train.seq_len = 1, 64
    model_cfg, tc, method = configuration.engine_configs(cap)
    assert (model_cfg.n_layer, tc.seq_len) == (1, 64)
    assert all(r["round_flops"] == 6 * capacity.round_flops(model_cfg, tc, method)["per_user"] for r in rows)
    assert result["targets"][0]["met"] is True
    assert "capacity.round_flops" in result["flop_convention"]
    md = open(os.path.join(tmp_path, "bench.md")).read()
    assert "| tiny | 6 | vmap_sharded | 2 |" in md and "GFLOP/s" in md


def test_bench_sweep_doubles_users_until_a_limit(tmp_path, capsys, monkeypatch):
    """--config.sweep=True doubles U from the first listed U: here 2 (all at once), 4 (two chunks of
    2), then stops before U = 8 (sweep_max_users=4), and reports the largest U that completed a
    round with its round time. With a memory limit below what the first U needs, it stops before
    running anything (the capacity model's prediction, nothing allocated)."""
    argv = ["experiments.bench", *SMALL, "--config.users=2", "--config.modes=vmap", "--config.user_chunk=2",
            "--config.sweep=True", "--config.sweep_max_users=4", f"--config.out_dir={tmp_path / 'a'}"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    result = json.load(open(tmp_path / "a" / "bench.json"))
    rows, (sw,) = result["rows"], result["sweeps"]
    assert [(r["users"], r["chunk"]) for r in rows] == [(2, 0), (4, 2)]
    assert sw["largest"]["users"] == 4 and sw["largest"]["round_s"] == rows[1]["round_s"] > 0
    assert sw["stopped"] == "U=8 > sweep_max_users=4" and sw["limit"].startswith("90% of ")
    assert [u for u, _ in sw["measured_bytes"]] == [2, 4]
    assert all(r["predicted_bytes"] >= r["model_bytes"] > 0 for r in rows)
    assert "sweep tiny: largest U that completed a round: U = 4 (vmap, chunk 2, " in out

    # A limit below this process's own resident set: the first U would exceed it, so nothing runs.
    frac = 0.5 * timing._rss_bytes() / (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    argv = ["experiments.bench", *SMALL, "--config.users=2", "--config.modes=vmap", "--config.sweep=True",
            f"--config.sweep_fraction={frac}", f"--config.out_dir={tmp_path / 'b'}"]
    assert bench.main(argv) == 0
    result = json.load(open(tmp_path / "b" / "bench.json"))
    (sw,) = result["sweeps"]
    assert result["rows"] == [] and sw["largest"] is None and sw["stopped"].startswith("U=2 would need ")
    assert "largest U that completed a round: none; stopped: U=2 would need" in capsys.readouterr().out


def test_workloads_are_built_as_capacity_builds_them():
    cfg = get_config()
    for name in ("tiny", "gpt2"):
        model_cfg, tc, method = workload.workload_configs(name, cfg[name], "comigs", "float32")
        assert (model_cfg.n_layer, model_cfg.vocab_size, tc.batch_size) == (
            {"tiny": 2, "gpt2": 12}[name], {"tiny": 2048, "gpt2": 50257}[name], {"tiny": 2, "gpt2": 4}[name])
        assert model_cfg.moe.n_experts == 2 and model_cfg.attn_lora.rank == 8 and tc.local_steps == 2
    # mini: the issue-15 shape (4 x 256 GPT-2, real vocabulary, batch 8 x 128; 1 router step per 3
    # expert steps, as the study's 10 every 30)
    model_cfg, tc, _ = workload.workload_configs("mini", cfg.mini, "comigs", "float32")
    assert (model_cfg.n_layer, model_cfg.n_embd, model_cfg.n_head, model_cfg.vocab_size) == (4, 256, 4, 50257)
    assert (tc.batch_size, tc.seq_len, tc.local_steps, tc.router_every, tc.router_steps) == (8, 128, 3, 3, 1)
    assert model_cfg.moe.n_experts == 2 and model_cfg.moe.n_generalists == 1
    tiny = workload.workload_configs("tiny", cfg.tiny, "comigs", "float32")
    assert tiny == configuration.engine_configs(capacity_config.get_config("tiny"))
    cfg.tiny.train.local_steps = 3  # not a multiple of router_every: one line, the workload's key
    with pytest.raises(configuration.ConfigError, match=r"^config\.tiny\.train\.local_steps=3 is not allowed"):
        workload.workload_configs("tiny", cfg.tiny, "comigs", "float32")


@pytest.mark.parametrize("flag, names", [
    ("--config.tiny.model.rnak=4", "'tiny.model.rnak'"),       # unknown key in a workload's model group
    ("--config.userz=4", "'userz'"),                           # unknown top-level key
    ("--config.tiny.model.top_k=3", "config.tiny.model.top_k=3"),  # a value the model does not allow
    ("--config.modes=vmap,loop", "config.modes='vmap,loop'"),
    ("--config.user_chunk=-1", "config.user_chunk=-1 is not allowed"),
    ("--config.remat=all", "config.remat='all' is not allowed: none | block | moe"),
    ("--config.tiny.train.user_chunk=2", "'tiny.train.user_chunk'"),  # the bench's is top-level
    ("--config.sweep_fraction=0", "config.sweep_fraction=0"),
    ("--config.models=tiny,small", "config.models='tiny,small' is not allowed: comma-separated, of tiny, mini, gpt2"),
    ("--config.models=mini --config.mini.users=0", "config.mini.users='0'"),  # a listed workload's U
    ("--config.checkpoints=sync,fast", "config.checkpoints='sync,fast' is not allowed"),
    ("--config.checkpoints=sync --config.checkpoint_rounds=0", "config.checkpoint_rounds=0 is not allowed"),
])
def test_bench_command_line_errors_are_one_line(flag, names, capsys, tmp_path):
    assert bench.main(["experiments.bench", *flag.split(), f"--config.out_dir={tmp_path}"]) == 1
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
    t = {x["target"]: x for x in report.check_targets(rows, "cpu")}
    assert t["tiny U=64: vmap >= 5x loop_step tokens/s"] == {
        "target": "tiny U=64: vmap >= 5x loop_step tokens/s", "value": 4.0, "met": False}
    assert t["tiny U=64: vmap faster than loop_round"]["met"] is True
    assert t["tiny U=256 runs in one process"]["met"] is True
    assert t["CPU GPT-2 124M round >= 50% of matmul peak"]["value"] == 0.3
    assert not t["CPU GPT-2 124M round >= 50% of matmul peak"]["met"]


def test_sweep_extrapolates_measured_bytes():
    """The next U's bytes from the measured ones: from one point, the part above what was resident
    before the sweep grows with U; from two or more, the line through the last two."""
    assert sweep._extrapolate([], 512) == 0.0
    assert sweep._extrapolate([(256, 3.0)], 512, baseline=1.0) == 5.0
    assert sweep._extrapolate([(128, 2.0), (256, 3.0)], 512, baseline=1.0) == 5.0
    assert sweep._extrapolate([(64, 1.0), (128, 2.0), (256, 2.5)], 512) == 3.5


def test_many_users_targets():
    """The issue's CPU targets for train.user_chunk, from bench rows: U = 4,096 within 24 GiB, its
    round within 1.2 x 16 x the U = 256 round, its compile within 1.5 x the U = 64 compile."""
    def row(users, round_s, compile_s, rss):
        return {"model": "tiny", "users": users, "mode": "vmap", "dtype": "float32", "round_s": round_s,
                "compile_s": compile_s, "tokens_per_s": 1.0, "fraction_of_peak": 0.1, "peak_rss_gib": rss,
                "losses_agree": True}
    t = {x["target"]: x for x in report.check_targets([row(64, 1.0, 10.0, 2.0), row(256, 4.0, 11.0, 3.0),
                                                      row(4096, 70.0, 16.0, 9.0)], "cpu")}
    assert t["tiny U=4096 vmap completes a round in one process within 24 GiB peak RSS"]["met"] is True
    r = t["tiny vmap: round at U=4096 <= 1.2 x (4096/256) x round at U=256"]
    assert r["value"] == round(70 / 64, 3) and r["met"] is True
    c = t["tiny vmap: compile at U=4096 <= 1.5 x compile at U=64"]
    assert c["value"] == 1.6 and c["met"] is False
