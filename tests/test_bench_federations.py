"""experiments.bench_federations on the tiny config, in-process through its command line: F = 2
seeds as one program against 2 separate programs (each from cleared caches, as a fresh process):
one round program instead of two, fewer XLA compiles, the same final test cross-entropy."""
import json
import os

from experiments import bench_federations
from tiny import TOL64


def test_bench_federations_tiny(tiny_cache, tmp_path, capsys, x64):
    argv = ["experiments.bench_federations", "--config=configs/tiny.py", "--config.seeds=0,7",
            "--config.model.dtype=float64",  # two programs: tests/tiny.py TOL64
            "--config.train.rounds=2", "--config.eval.every_rounds=1", f"--config.data.cache_dir={tiny_cache}",
            f"--workdir={tmp_path}"]
    assert bench_federations.main(argv) == 0
    out = capsys.readouterr().out
    r = json.load(open(os.path.join(tmp_path, "bench_federations.json")))
    assert r["seeds"] == [0, 7] and r["rounds"] == 2 and r["method"] == "comigs"
    sep, st = r["separate"], r["stacked"]
    assert [s["round_programs"] for s in r["separate_each"]] == [1, 1] and st["round_programs"] == 1
    # the stacked program compiles a few more (the federations' init, the grouped mean), but once
    assert sep["compiles"] > st["compiles"] >= r["separate_each"][0]["compiles"]
    assert sep["compiles"] == sum(s["compiles"] for s in r["separate_each"])
    assert r["wall_ratio"] == st["wall_s"] / sep["wall_s"]
    assert r["max_abs_test_ce_diff"] <= TOL64["atol"]
    assert f"wall stacked / separate = {r['wall_ratio']:.3f}" in out and "2 seeds of comigs" in out
