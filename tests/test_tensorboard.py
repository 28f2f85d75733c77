"""--config.output.tensorboard=True: the per-round metrics as TensorBoard events (tensorboardX),
read back here with a plain TFRecord reader and tensorboardX's own protobufs (no TensorFlow) and
compared with metrics.jsonl; a resumed run shows every round once."""
import glob
import json
import os
import shutil
import struct

import numpy as np
import pytest
from entrypoint import main
from tiny import as_if_killed_after_round

from comigs_jax.experiment.metrics import MetricsWriter, tensorboard_scalars

TINY = "--config=configs/tiny.py"


def read_events(logdir):
    """{tag: [(step, value), ...]} of the scalars over every event file of `logdir` (TFRecord
    framing: length, its CRC, the serialized Event, its CRC); a histogram's value is its
    (count, min, max, sum)."""
    from tensorboardX.proto import event_pb2
    out = {}
    files = sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*")))
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                value = (v.histo.num, v.histo.min, v.histo.max, v.histo.sum) if v.HasField("histo") else v.simple_value
                out.setdefault(v.tag, []).append((ev.step, value))
    return out, files


def records(wd):
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_scalars_of_a_record():
    rec = {"round": 3, "step": 9, "lr": 0.5, "tokens_per_s": 10.0, "includes_compile": True,
           "train_loss": [1.0, 3.0], "router_val_ce": [2.0, None], "test_ppl": [4.0, 6.0],
           "routing": [[[0.25, 0.75], [0.75, 0.25]], [[1.0, 0.0], [0.0, 1.0]]]}
    s = dict(tensorboard_scalars(rec, ["de wiki", "fr"]))
    assert s["lr"] == 0.5 and s["tokens_per_s"] == 10.0 and "round" not in s and "includes_compile" not in s
    assert s["train_loss/de_wiki"] == 1.0 and s["train_loss/fr"] == 3.0 and s["train_loss/mean_of_users"] == 2.0
    assert s["router_val_ce/de_wiki"] == 2.0 and "router_val_ce/fr" not in s and s["router_val_ce/mean_of_users"] == 2.0
    assert s["routing/de_wiki/expert0"] == 0.5 and s["routing/fr/expert1"] == 0.5  # the mean over layers
    assert dict(tensorboard_scalars({"round": 1, "train_loss": [1.0]}, ["a", "b"]))["train_loss/user0"] == 1.0


def test_other_processes_write_no_events(tmp_path):
    w = MetricsWriter(None, tensorboard=True, users=["a"])
    w.truncate(0)
    w.write({"round": 1, "train_loss": [1.0]})
    assert w.tensorboard_dir is None and os.listdir(tmp_path) == []


@pytest.fixture
def resumed(tiny_reference, tiny_cache, tmp_path):
    """The session's finished tiny run without its round-4 checkpoint and results: resumed from
    round 2 with TensorBoard on (rounds 1-2 replayed from metrics.jsonl, 3-4 written live)."""
    wd = str(tmp_path / "tb")
    shutil.copytree(tiny_reference[0], wd)
    as_if_killed_after_round(wd)
    p = main([TINY, f"--workdir={wd}", "--config.output.tensorboard=True", "--config.output.figures=False"],
             tiny_cache)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "resumed from round 2" in p.stdout
    return wd


def check_events_match(wd):
    recs = records(wd)
    events, files = read_events(os.path.join(wd, "tensorboard"))
    assert len(files) == 1
    histo = events.pop("test_ppl/users")  # one histogram of the users' test perplexity per evaluation
    ppl = {r["round"]: r["test_ppl"] for r in recs if "test_ppl" in r}
    assert [s for s, _ in histo] == sorted(ppl)
    for step, (n, lo, hi, total) in histo:
        np.testing.assert_allclose([n, lo, hi, total], [len(ppl[step]), min(ppl[step]), max(ppl[step]), sum(ppl[step])],
                                   rtol=1e-6)
    users = [u["user"] for u in json.load(open(os.path.join(wd, "results.json")))["users"]]
    expected = {}
    for r in recs:
        for tag, v in tensorboard_scalars(r, users):
            expected.setdefault(tag, []).append((r["round"], v))
    assert set(events) == set(expected)
    for tag, pairs in expected.items():
        got = events[tag]
        assert [s for s, _ in got] == [s for s, _ in pairs], tag  # each round once, in order
        np.testing.assert_allclose([v for _, v in got], [v for _, v in pairs], rtol=1e-6, err_msg=tag)
    # the brief's quantities are all there, per user
    u = users[0]
    for tag in (f"train_loss/{u}", f"router_val_ce/{u}", f"generalist_share/{u}", f"routing/{u}/expert0",
                "lr", "tokens_per_s", f"test_ppl/{u}", "test_ppl/p50", "test_ppl/worst10_mean"):
        assert tag in events, tag
    assert [s for s, _ in events["lr"]] == [1, 2, 3, 4]
    assert [s for s, _ in events[f"test_ppl/{u}"]] == [2, 4]
    return events


def test_events_match_metrics_jsonl_and_a_resume_does_not_duplicate(resumed, tiny_cache):
    first = check_events_match(resumed)
    # resumed again (finished): the events are rewritten from metrics.jsonl, still each round once
    p = main([TINY, f"--workdir={resumed}", "--config.output.tensorboard=True", "--config.output.figures=False"],
             tiny_cache)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert check_events_match(resumed) == first
