"""experiments.run through its entry point, `main(argv)` in this process (tests/entrypoint.py), on
configs/tiny.py; the finished run is the session's reference (conftest.tiny_reference)."""
import json
import os
import shutil

import pytest

from entrypoint import main as run
from tiny import as_if_killed_after_round


@pytest.fixture
def cache(tiny_cache):
    return tiny_cache


@pytest.fixture
def finished(tiny_reference):
    return tiny_reference


def test_run_writes_every_output(finished):
    wd, p = finished
    for f in ("config.json", "metrics.jsonl", "results.json", "results.md", "loss_curves.png",
              "generalist_share.png", "routing_tokens.png"):
        assert os.path.getsize(os.path.join(wd, f)) > 0, f
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["2", "4"]
    records = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    assert all(len(r["train_ce"]) == 3 for r in records)
    # 3 steps a round and a router phase (2 steps) every 3rd step: one phase per round and user.
    assert [r["router_steps"] for r in records] == [[2, 2, 2]] * 4
    assert "test_ppl" in records[1] and "test_ppl" not in records[0]
    res = json.load(open(os.path.join(wd, "results.json")))
    assert res["method"] == "comigs" and res["faithful"] is False and res["eval"]["protocol"] == "full"
    assert len(res["users"]) == 3
    for u in res["users"]:
        assert u["test_ppl"] >= u["bayes_ppl"] > 1.0  # nobody beats the Bayes-optimal floor
        assert 0.0 <= u["generalist_share"] <= 1.0
    assert records[-1]["test_ppl"] == pytest.approx([u["test_ppl"] for u in res["users"]], rel=1e-6)
    assert "Bayes-optimal ppl" in p.stdout and "| **mean** |" in p.stdout


def test_resume_from_a_checkpoint_gives_the_same_results(finished, cache, tmp_path):
    wd, _ = finished
    wd2 = str(tmp_path / "resumed")
    shutil.copytree(wd, wd2)
    as_if_killed_after_round(wd2)  # as if killed after round 2's checkpoint
    p = run(["--config=configs/tiny.py", f"--workdir={wd2}"], cache)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from round 2" in p.stdout
    a = json.load(open(os.path.join(wd, "results.json")))
    b = json.load(open(os.path.join(wd2, "results.json")))
    for key in ("speed", "provenance"):  # wall-clock timings, and when and where it ran: all that may differ
        a.pop(key), b.pop(key)
    assert a == b
    rounds = [json.loads(l)["round"] for l in open(os.path.join(wd2, "metrics.jsonl"))]
    assert rounds == [1, 2, 3, 4]


def test_refuses_a_workdir_of_another_config(finished, cache):
    wd, _ = finished
    for extra in ([], ["--config.resume=False"]):
        p = run(["--config=configs/tiny.py", f"--workdir={wd}", "--config.train.lr=0.01", *extra], cache)
        assert p.returncode != 0
        assert "holds a run of another config (train.lr" in p.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("args,message", [
    (["--config.nonexistent=1"], "unknown config key 'nonexistent'"),
    (["--config=configs/missing.py"], "config file 'configs/missing.py' not found"),
    (["--config.model.top_k=3"], "config.model.top_k=3 is not allowed"),
])
def test_bad_flags_fail_with_one_clear_line(args, message, cache):
    p = run(args, cache)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], p.stderr


def test_a_key_added_since_the_run_was_written_matches_only_its_old_value(tmp_path):
    """A workdir written before model.ranks existed resumes while the config keeps the value those
    runs had (""); any other value is another config, named in one line."""
    from comigs_jax.errors import WorkdirError
    from comigs_jax.experiment.identity import check_workdir
    old = {"method": "comigs", "seed": 0, "train.lr": 0.002}
    (tmp_path / "config.json").write_text(json.dumps({"identity": old}))
    assert check_workdir(str(tmp_path), {**old, "model.ranks": "", "train.prune_lambda": 0.0}, True) is True
    with pytest.raises(WorkdirError, match=r"another config \(model.ranks: '' there, '4,8' now\)"):
        check_workdir(str(tmp_path), {**old, "model.ranks": "4,8"}, True)
    with pytest.raises(WorkdirError, match=r"another config \(model.new_key: None there"):
        check_workdir(str(tmp_path), {**old, "model.new_key": 1}, True)  # not a known addition
