"""experiments.bench's `smollm2` workload (a Llama): its configs, its target, and the bench run on a
tiny Llama in its place (a 1-layer size added to LLAMA_SIZES for the test, seconds instead of the
real 135M's minutes; vmap only: the engine's tests check that the modes agree for Llama), whose
FLOPs are the capacity model's."""
import json
import os

import numpy as np

from comigs_jax import capacity
from comigs_jax.capacity import report, workload
from comigs_jax.model.config import LLAMA_SIZES, LlamaConfig
from configs.bench import WORKLOADS, get_config
from experiments import bench

TINY_LLAMA = dict(vocab_size=384, n_positions=64, n_embd=32, n_layer=1, n_head=4, n_kv_head=2, intermediate_size=64,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)


def test_smollm2_workload_is_smollm2_135m():
    cfg = get_config()
    assert "smollm2" in WORKLOADS and "smollm2" not in cfg.models.split(",")
    model_cfg, tc, method = workload.workload_configs("smollm2", cfg.smollm2, "comigs", "float32")
    assert isinstance(model_cfg, LlamaConfig) and model_cfg.base == LlamaConfig(**LLAMA_SIZES["smollm2-135m"])
    assert (model_cfg.vocab_size, model_cfg.n_kv_head, model_cfg.intermediate_size) == (49152, 3, 1536)
    assert (model_cfg.moe.n_experts, model_cfg.moe.n_generalists, model_cfg.attn_lora.rank) == (2, 1, 8)
    assert (tc.batch_size, tc.seq_len, tc.local_steps, tc.router_every, tc.router_steps) == (4, 128, 2, 2, 1)
    assert cfg.smollm2.users == "2"
    # vocab_size 0: the named base's own vocabulary
    cfg.smollm2.vocab_size = 0
    assert workload.workload_configs("smollm2", cfg.smollm2, "comigs", "float32")[0].vocab_size == 49152


def test_smollm2_target():
    def row(mode, frac, tps):
        return {"model": "smollm2", "users": 2, "mode": mode, "dtype": "float32", "round_s": 1.0,
                "tokens_per_s": tps, "fraction_of_peak": frac, "peak_rss_gib": 1.0, "losses_agree": True}
    t = {x["target"]: x for x in report.check_targets([row("loop_step", 0.4, 100.0), row("vmap", 0.45, 120.0)], "cpu")}
    assert t["smollm2 U=2 vmap >= 50% of matmul peak"] == {"target": "smollm2 U=2 vmap >= 50% of matmul peak",
                                                          "value": 0.45, "met": False}
    assert t["smollm2 U=2 vmap tokens/s / loop_step tokens/s"]["value"] == 1.2


def test_bench_runs_a_tiny_llama_in_the_smollm2_workload(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(LLAMA_SIZES, "llama-tiny", TINY_LLAMA)
    argv = ["experiments.bench", "--config.models=smollm2", "--config.modes=vmap",
            "--config.smollm2.base=llama-tiny", "--config.smollm2.vocab_size=0", "--config.smollm2.train.seq_len=32",
            "--config.smollm2.train.batch_size=1", "--config.smollm2.train_tokens=256",
            "--config.smollm2.valid_tokens=128", "--config.repeats=1", "--config.min_repeats=1",
            "--config.matmul_size=256", f"--config.out_dir={tmp_path}"]
    assert bench.main(argv) == 0
    result = json.load(open(os.path.join(tmp_path, "bench.json")))
    rows = result["rows"]
    assert [(r["model"], r["users"], r["mode"]) for r in rows] == [("smollm2", 2, "vmap")]
    assert np.isfinite(rows[0]["first_round_mean_loss"]) and rows[0]["tokens_per_s"] > 0
    w = get_config().smollm2
    w.base, w.vocab_size, w.train.seq_len, w.train.batch_size = "llama-tiny", 0, 32, 1
    model_cfg, tc, method = workload.workload_configs("smollm2", w, "comigs", "float32")
    assert (model_cfg.family, model_cfg.n_layer, model_cfg.vocab_size) == ("llama", 1, 384)
    assert all(r["round_flops"] == 2 * capacity.round_flops(model_cfg, tc, method)["per_user"] for r in rows)
    targets = {t["target"]: t for t in result["targets"]}
    assert "smollm2 U=2 vmap >= 50% of matmul peak" in targets
    assert "| smollm2 | 2 | vmap | 1 | all |" in capsys.readouterr().out
