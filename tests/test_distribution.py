"""Per-user distributions of test perplexity (comigs_jax/experiment/distribution.py): quantiles
against NumPy and hand-computed values, the per-user limit in TensorBoard tags and results.md,
users.csv, and a real run's metrics.jsonl, results.json, results.md and histogram figure."""
import contextlib
import csv
import io
import json
import math
import os

import numpy as np
import pytest

from comigs_jax.experiment import distribution as dist
from comigs_jax.experiment.metrics import results_markdown, tensorboard_scalars

V = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6, 5.0, 3.5, 8.0, 7.9, 10.5, 2.0]  # 12 users


def test_quantiles_match_numpy_and_hand_values():
    q = dist.quantiles(V)
    for name, p in dist.QUANTILES:
        assert q[name] == pytest.approx(float(np.quantile(np.asarray(V), p)), abs=1e-12)
    # sorted: 1.0 1.5 2.0 2.6 3.0 3.5 4.0 5.0 7.9 8.0 9.0 10.5; position p * 11, linear
    assert (q["p10"], q["p50"], q["p90"]) == pytest.approx((1.55, 3.75, 8.9), abs=1e-12)
    assert q["worst10_mean"] == pytest.approx((10.5 + 9.0) / 2) and q["n"] == 12  # ceil(1.2) = 2 users
    assert dist.quantiles([4.0, None, 2.0])["worst10_mean"] == 4.0  # one user at least; None skipped
    assert dist.quantiles([]) == {"n": 0}
    rng = np.random.default_rng(0)
    v = rng.lognormal(3.0, 0.5, 501)
    k = math.ceil(0.1 * 501)
    assert dist.quantiles(v)["worst10_mean"] == pytest.approx(np.sort(v)[::-1][:k].mean(), rel=1e-12)


def test_record_quantiles_and_tensorboard_limit():
    rec = dist.add_quantiles({"round": 2, "train_loss": [1.0, 2.0, 3.0], "test_ppl": [4.0, 6.0, 11.0],
                              "routing": [[[0.5, 0.5]]] * 3})
    assert rec["test_ppl_quantiles"] == dist.quantiles([4.0, 6.0, 11.0])
    users = ["a", "b", "c"]
    shown = dict(tensorboard_scalars(rec, users, per_user_limit=3))
    hidden = dict(tensorboard_scalars(rec, users, per_user_limit=2))
    assert shown["test_ppl/a"] == 4.0 and "routing/c/expert1" in shown
    assert not any(t.endswith(("/a", "/b", "/c")) or t.startswith("routing/") for t in hidden), hidden
    for s in (shown, hidden):
        assert s["test_ppl/p50"] == 6.0 and s["test_ppl/worst10_mean"] == 11.0
        assert s["test_ppl/mean_of_users"] == 7.0 and s["train_loss/mean_of_users"] == 2.0
        assert "test_ppl/n" not in s


def _res(n, limit):
    users = [{"user": f"u{i}", "test_ppl": float(i + 2), "test_ppl_post_aggregation": float(i + 3),
              "generalist_share": 0.5, "generalist_selection": 0.5} for i in range(n)]
    records = [{"round": 1, "test_ppl": [u["test_ppl"] * 2 for u in users]}]
    return {"method": "comigs", "seed": 0, "router_mode": "bilevel", "faithful": False, "eval": {"protocol": "full"},
            "users": users, "mean_test_ppl": float(np.mean([u["test_ppl"] for u in users])),
            "mean_test_ppl_post_aggregation": 0.0, "test_ppl_distribution": dist.summary(users, records, limit)}


def test_results_markdown_and_csv():
    small, large = results_markdown(_res(3, 3)), results_markdown(_res(5, 3))
    assert "| u2 |" in small and "| u2 |" not in large and "above output.per_user_limit=3" in large
    q = dist.quantiles([2.0, 3.0, 4.0, 5.0, 6.0])
    assert f"| final (before aggregation) | {q['p10']:.3f} | {q['p50']:.3f} | {q['p90']:.3f} | 6.000 |" in large
    assert "| round 1 | " in large
    rows = list(csv.DictReader(io.StringIO(dist.users_csv(_res(5, 3)["users"]))))
    assert [r["user"] for r in rows] == [f"u{i}" for i in range(5)]
    assert [float(r["test_ppl"]) for r in rows] == [2.0, 3.0, 4.0, 5.0, 6.0]


@pytest.mark.parametrize("value", [0, -3])
def test_limit_of_zero_or_less_is_one_line(value, tmp_path):
    from experiments import run
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = run.main(["experiments.run", "--config=configs/tiny.py", f"--workdir={tmp_path / 'wd'}",
                         f"--config.output.per_user_limit={value}"])
    lines = err.getvalue().strip().splitlines()
    assert code == 1 and len(lines) == 1 and f"config.output.per_user_limit={value} is not allowed" in lines[0]
    assert not (tmp_path / "wd").exists()


def test_a_run_writes_quantiles_csv_and_histogram(tiny_reference):
    wd = tiny_reference[0]
    res = json.load(open(os.path.join(wd, "results.json")))
    ppl = [u["test_ppl"] for u in res["users"]]
    d = res["test_ppl_distribution"]
    assert d["final"]["p50"] == pytest.approx(float(np.median(ppl)), rel=1e-12)
    assert d["final"] == pytest.approx(dist.quantiles(ppl))
    records = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    evaluated = [r for r in records if "test_ppl" in r]
    assert [r["round"] for r in d["rounds"]] == [r["round"] for r in evaluated] == [2, 4]
    for r in evaluated:
        assert r["test_ppl_quantiles"]["p90"] == pytest.approx(float(np.quantile(r["test_ppl"], 0.9)), rel=1e-12)
    rows = list(csv.DictReader(open(os.path.join(wd, "users.csv"))))
    assert [float(r["test_ppl"]) for r in rows] == ppl
    assert "Per-user test perplexity over 3 users" in open(os.path.join(wd, "results.md")).read()
    assert os.path.getsize(os.path.join(wd, "test_ppl_histogram.png")) > 1000
