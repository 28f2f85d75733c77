"""experiments.bench on the tiny config at U = 2: the four modes compare like with like."""
import json
import os

import numpy as np

from configs.bench import get_config
from experiments import bench


def test_bench_tiny_u2_all_modes_agree(tmp_path):
    cfg = get_config()
    cfg.models, cfg.users, cfg.out_dir = "tiny", "2", str(tmp_path)
    cfg.repeats = cfg.min_repeats = 1
    cfg.matmul_size = 512
    result = bench.run_benchmark(cfg)

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
    assert by_mode["loop_step"]["speedup_vs_loop_step"] == 1.0
    mc = cfg.tiny  # the FLOPs of a round: U x (expert steps + router steps), per-user costs
    expect = 2 * (mc.local_steps * rows[0]["flops_expert_step"]
                  + mc.local_steps // mc.router_every * mc.router_steps * rows[0]["flops_router_step"])
    assert rows[0]["round_flops"] == expect
    assert result["targets"][0]["met"] is True

    saved = json.load(open(os.path.join(tmp_path, "bench.json")))
    assert saved["rows"][2]["mode"] == "vmap" and "flop_convention" in saved
    md = open(os.path.join(tmp_path, "bench.md")).read()
    assert "| tiny | 2 | vmap_sharded | 2 |" in md and "GFLOP/s" in md


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
