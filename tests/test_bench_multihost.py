"""experiments.bench as two JAX processes (2 x 4 fake CPU devices, gloo), as a pod's hosts run it:
only vmap_sharded, over the global mesh; process 0 alone writes; the work equals 1 process x 8."""
import json
import os
import signal
import subprocess
import sys
import time

import procenv
from tiny import TOL64

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny model, made smaller still (one layer, a 256-token vocabulary, 16-token windows, a 64 x 64
# peak matmul): the work is compared, not the speed, so only the program's shape matters.
FLAGS = ["--config.models=tiny", "--config.repeats=1", "--config.min_repeats=1",
         "--config.matmul_size=64", "--config.tiny.pretrain.n_layer=1", "--config.tiny.vocab_size=256",
         "--config.tiny.train.seq_len=16", "--config.tiny.train_tokens=512", "--config.tiny.valid_tokens=256",
         "--config.dtype=float64"]  # the pair and the one process are different programs: TOL64


def _env(devices):
    return procenv.env(devices, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                       JAX_ENABLE_X64="1")


def test_bench_two_processes(tmp_path, capsys, x64):
    from experiments import bench
    multi, single = tmp_path / "multi", tmp_path / "single"
    t0 = time.time()
    # The pair in two processes, and meanwhile the one-process reference in this one (8 fake devices,
    # 64-bit JAX as the pair's; they share the cores: only the work, not the speed, is compared).
    # The pair's output goes to files: a full pipe would stall it while this process is busy.
    with open(tmp_path / "pair.out", "w") as out, open(tmp_path / "pair.err", "w") as err:
        pm = subprocess.Popen([sys.executable, "-m", "experiments.launch_local", "--processes", "2",
                               "--devices-per-process", "4", "--module", "experiments.bench", "--timeout", "240",
                               "--", *FLAGS, "--config.users=12,16", f"--config.out_dir={multi}"], cwd=REPO,
                              env=_env(1), stdout=out, stderr=err, text=True)
    try:
        code_s = bench.main(["experiments.bench", *FLAGS, "--config.users=16", "--config.modes=vmap_sharded",
                             f"--config.out_dir={single}"])
        out_s = capsys.readouterr()
        pm.wait(timeout=300)
    finally:
        if pm.poll() is None:  # the launcher stops its processes on SIGINT (and at its own timeout)
            pm.send_signal(signal.SIGINT)
            try:
                pm.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pm.kill()
    out_m, err_m = (tmp_path / "pair.out").read_text(), (tmp_path / "pair.err").read_text()
    print(f"both runs: {time.time() - t0:.1f} s")
    assert pm.returncode == 0, out_m[-3000:] + err_m[-3000:]
    assert code_s == 0, out_s.out[-3000:] + out_s.err[-3000:]

    assert sorted(os.listdir(multi)) == ["bench.json", "bench.md"]
    out = json.load(open(multi / "bench.json"))
    m = out["machine"]
    assert (m["process_count"], m["device_count"], m["local_device_count"]) == (2, 8, 4)
    assert {r["mode"] for r in out["rows"]} == {"vmap_sharded"}
    assert [r["users"] for r in out["rows"]] == [12, 16]
    skipped, r = out["rows"]  # 12 users do not divide 8 devices: skipped, and said so
    assert "round_s" not in skipped and "does not divide the 8 devices of 2 processes" in skipped["skipped"]
    assert "U=12 vmap_sharded skipped" in out_m
    assert "loop_step, loop_round, vmap skipped" in out_m
    assert r["devices"] == 8 and r["tokens_per_s"] > 0 and r["fraction_of_peak"] > 0 and r["round_flops"] > 0
    assert len(out["peak_matmul"]["per_process_flops_per_s"]) == 2
    assert "sum of the 2 processes'" in out["peak_matmul"]["fraction_against"]
    assert "8 × cpu over 2 processes" in open(multi / "bench.md").read()
    assert out_m.count("| tiny | 16 | vmap_sharded | 8 |") == 1  # the table, once

    one = json.load(open(single / "bench.json"))
    assert (one["machine"]["process_count"], one["machine"]["device_count"]) == (1, 8)
    (ref,) = one["rows"]
    assert (ref["users"], ref["mode"], ref["devices"]) == (16, "vmap_sharded", 8)
    assert r["round_flops"] == ref["round_flops"]  # the same work ...
    assert abs(r["first_round_mean_loss"] - ref["first_round_mean_loss"]) < TOL64["atol"]  # ... the same losses
