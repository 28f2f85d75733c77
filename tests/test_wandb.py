"""--config.output.wandb=True (comigs_jax/experiment/tracking.py): with WANDB_MODE=offline and no
account, the run's W&B files hold what TensorBoard gets (metrics.jsonl's scalars per round, the
test-perplexity histogram) and the config and provenance; read back here from the offline run's
.wandb file (W&B's record log: a 7-byte header, then LevelDB-framed protobuf Records). Without
wandb installed, asking for it is one line naming the extra."""
import contextlib
import glob
import io
import json
import os
import shutil
import sys
import time

import numpy as np
import pytest
from entrypoint import main

from comigs_jax import extras
from comigs_jax.experiment.metrics import tensorboard_scalars

TINY = "--config=configs/tiny.py"
BLOCK = 32768


def read_records(path):
    """Every Record of a .wandb file (FULL = 1, FIRST = 2, MIDDLE = 3, LAST = 4 chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", data[:8]
    i, out, buf = 7, [], b""
    while i + 7 <= len(data):
        if BLOCK - i % BLOCK < 7:  # a block's tail too short for a chunk header is padding
            i += BLOCK - i % BLOCK
            continue
        n, kind = int.from_bytes(data[i + 4:i + 6], "little"), data[i + 6]
        buf += data[i + 7:i + 7 + n]
        i += 7 + n
        if kind in (1, 4):
            out.append(pb.Record.FromString(buf))
            buf = b""
    return out


def finished_records(run_dir, timeout=60.0):
    """The records of the run's offline file once W&B's service has written it through its `exit`
    record (the service writes the file behind the finished run)."""
    (path,) = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))
    end = time.monotonic() + timeout
    while True:
        records = read_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > end:
            return records
        time.sleep(0.2)


def history_and_config(run_dir):
    history, config = {}, {}
    for r in finished_records(run_dir):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            row = {(it.key or "/".join(it.nested_key)): json.loads(it.value_json) for it in r.history.item}
            history[int(r.history.step.num)] = row
        elif kind in ("config", "run"):  # the config given to wandb.init travels in the run record
            items = r.config.update if kind == "config" else r.run.config.update
            config.update({(it.key or "/".join(it.nested_key)): json.loads(it.value_json) for it in items})
    return history, config


def test_offline_run_holds_tensorboards_numbers_config_and_provenance(tiny_reference, tiny_cache, tmp_path,
                                                                       monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    wd = str(tmp_path / "wb")
    shutil.copytree(tiny_reference[0], wd)  # resumed from round 2: rounds 1-2 from metrics.jsonl, 3-4 live
    shutil.rmtree(os.path.join(wd, "checkpoints", "4"))
    os.remove(os.path.join(wd, "results.json"))
    p = main([TINY, f"--workdir={wd}", "--config.output.wandb=True", "--config.output.figures=False",
              "--config.output.wandb_project=test"], tiny_cache)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    history, config = history_and_config(wd)
    records = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    users = [u["user"] for u in json.load(open(os.path.join(wd, "results.json")))["users"]]
    assert sorted(history) == [r["round"] for r in records] == [1, 2, 3, 4]
    for r in records:
        row = history[r["round"]]
        got = {k: v for k, v in row.items() if not k.startswith(("_", "test_ppl/users"))}
        want = dict(tensorboard_scalars(r, users, 64))
        assert set(got) == set(want), (r["round"], set(got) ^ set(want))
        np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=1e-6)
        if "test_ppl" in r:  # the users' histogram per evaluation: every user counted once
            assert row["test_ppl/users/_type"] == "histogram" and sum(row["test_ppl/users/values"]) == len(users)
        else:
            assert not any(k.startswith("test_ppl/users") for k in row)
    assert "test_ppl/p50" in history[4] and f"train_loss/{users[0]}" in history[1]
    summary = {}
    for rec in finished_records(wd):
        if rec.WhichOneof("record_type") == "summary":
            summary.update({(it.key or "/".join(it.nested_key)): json.loads(it.value_json) for it in rec.summary.update})
    res = json.load(open(os.path.join(wd, "results.json")))
    assert summary["mean_test_ppl"] == pytest.approx(res["mean_test_ppl"], rel=1e-9)
    assert summary["final_test_ppl/p90"] == pytest.approx(res["test_ppl_distribution"]["final"]["p90"], rel=1e-9)
    cfg = config
    assert cfg["train"]["rounds"] == 4 and cfg["output"]["wandb"] is True
    assert cfg["provenance"]["versions"]["jax"] and cfg["provenance"]["device_count"] >= 1
    assert open(os.path.join(wd, "wandb_id")).read().strip() in os.path.basename(glob.glob(os.path.join(wd, "wandb", "offline-run-*"))[0])


def test_asked_for_but_not_installed_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setattr(extras, "available", lambda m: m != "wandb")
    from experiments import run
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = run.main(["comigs-run", TINY, f"--workdir={tmp_path / 'wd'}", "--config.output.wandb=True"])
    lines = err.getvalue().strip().splitlines()
    assert code == 1 and len(lines) == 1, err.getvalue()
    assert "pip install 'comigs_jax[wandb]'" in lines[0] and not (tmp_path / "wd").exists()
