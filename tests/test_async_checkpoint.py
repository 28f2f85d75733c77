"""Asynchronous checkpoints (checkpoint.async_save, issue 31): a save in flight is never taken for a
complete checkpoint, every path out of the loop waits for it, and an interrupted asynchronous run
resumes bit for bit. The background write is held open by a gate (an extra commit future that
blocks until released), so "in flight" is a state the test controls, not a race it hopes to win."""
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from entrypoint import main
from test_reliability import TINY, ckpt_rounds, results_bytes, rounds_logged


class _Gate:
    """An orbax commit future that completes when `event` is set (and records that it waited)."""

    def __init__(self, event, log):
        self.event, self.log = event, log

    def result(self, timeout=None):
        self.log.append("write held")
        self.event.wait()
        self.log.append("write released")


@pytest.fixture
def gate(monkeypatch):
    """(release event, log): every StandardCheckpointHandler save waits for the event; a timer
    releases it `hold` seconds after the write starts (the test sets `hold`, default 0.5 s)."""
    event, log, cfg = threading.Event(), [], {"hold": 0.5}
    original = ocp.StandardCheckpointHandler.async_save

    async def gated(self, *args, **kwargs):
        futures = list(await original(self, *args, **kwargs) or [])
        event.clear()
        threading.Timer(cfg["hold"], event.set).start()
        return futures + [_Gate(event, log)]

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", gated)
    return event, log, cfg


def _state(users=3):
    k = jax.random.PRNGKey(1)
    return {"a": jax.random.normal(k, (users, 64, 32)), "step": jnp.arange(users, dtype=jnp.int32)}


def test_async_save_is_in_flight_until_wait_and_then_restores_exactly(gate, tmp_path):
    from comigs_jax.experiment.checkpoint import RunCheckpoints
    event, log, _ = gate
    state = _state()
    want = jax.tree.map(np.asarray, state)
    with RunCheckpoints(str(tmp_path / "ck"), async_save=True) as c:
        c.save(1, state, {"round": 1})
        # returned with the write held open: not on disk under its final name, not complete
        assert not os.path.isdir(os.path.join(c.directory, "1")) and c.last_complete() is None
        state = jax.tree.map(lambda x: x * 0, state)  # the caller may reuse its arrays at once
        c.wait()  # the timer releases the write; wait returns only once the folder is renamed
        assert log == ["write held", "write released"]
        assert os.path.isdir(os.path.join(c.directory, "1")) and c.last_complete() == 1
    r, got, meta = RunCheckpoints(str(tmp_path / "ck")).restore_latest(jax.tree.map(jnp.asarray, want))
    assert r == 1 and meta["round"] == 1
    jax.tree.map(np.testing.assert_array_equal, got, want)  # what was passed to save, not what came after


def test_sync_save_returns_only_when_complete(gate, tmp_path):
    from comigs_jax.experiment.checkpoint import RunCheckpoints
    _, log, _ = gate
    with RunCheckpoints(str(tmp_path / "ck"), async_save=False) as c:
        c.save(1, _state(), {"round": 1})
        assert log == ["write held", "write released"] and os.path.isdir(os.path.join(c.directory, "1"))


def test_close_waits_for_the_save_in_flight(gate, tmp_path):
    """The loop's `finally` closes the managers: whatever ended the loop, the save completes."""
    from comigs_jax.experiment.checkpoint import RunCheckpoints
    c = RunCheckpoints(str(tmp_path / "ck"), async_save=True)
    c.save(3, _state(), {"round": 3})
    assert not os.path.isdir(os.path.join(c.directory, "3"))
    c.close()
    assert os.path.isdir(os.path.join(c.directory, "3"))
    assert RunCheckpoints(str(tmp_path / "ck")).all_rounds() == [3]


class _Failing:
    def result(self, timeout=None):
        raise OSError(28, "No space left on device")


def test_a_background_save_that_fails_is_one_line_never_a_checkpoint(monkeypatch, tmp_path):
    from comigs_jax.experiment.checkpoint import CheckpointError, RunCheckpoints
    original = ocp.StandardCheckpointHandler.async_save

    async def failing(self, *args, **kwargs):
        return list(await original(self, *args, **kwargs) or []) + [_Failing()]

    c = RunCheckpoints(str(tmp_path / "ck"), async_save=True)
    c.save(1, _state(), {"round": 1})
    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", failing)
    c.save(2, _state(), {"round": 2})  # returns: the write fails in orbax's thread
    with pytest.raises(CheckpointError, match=r"checkpoint of round 2 .* could not be written \(.*No space left") as e:
        c.close()
    assert "\n" not in str(e.value)
    assert RunCheckpoints(str(tmp_path / "ck")).all_rounds() == [1]  # round 1 intact, round 2 never listed


def test_stop_right_after_an_async_save_waits_for_it_then_resumes_bit_for_bit(gate, monkeypatch, tiny_reference,
                                                                              tiny_cache, tmp_path):
    """A stop requested during round 1: the loop saves round 1 (held in flight by the gate) and
    reports the stop only once that checkpoint is complete on disk; the resumed run (async too)
    ends bit for bit as the uninterrupted run."""
    import signal

    from comigs_jax.experiment import program
    from comigs_jax.experiment.signals import StopOnSignal
    wd = str(tmp_path / "stopped")
    seen = []
    original = program._stopped

    def stopped(prog, stop, round_index):  # the stop's report: the checkpoint must be complete now
        seen.append((round_index, os.path.isdir(os.path.join(wd, "checkpoints", str(round_index)))))
        return original(prog, stop, round_index)

    def requested(self):  # as a SIGTERM during round 1 would
        self.signum = signal.SIGTERM
        return True

    monkeypatch.setattr(program, "_stopped", stopped)
    monkeypatch.setattr(StopOnSignal, "requested", requested)
    p = main([TINY, f"--workdir={wd}", "--config.checkpoint.async_save=True"], tiny_cache)
    assert p.returncode == 128 + signal.SIGTERM, p.stdout[-3000:] + p.stderr[-3000:]
    assert seen == [(1, True)]
    assert gate[1] == ["write held", "write released"]
    assert ckpt_rounds(wd) == [1] and rounds_logged(wd) == [1]
    monkeypatch.undo()  # no gate, no forced stop: the resumption runs as a user's would
    q = main([TINY, f"--workdir={wd}", "--config.checkpoint.async_save=True"], tiny_cache)
    assert q.returncode == 0, q.stdout[-3000:] + q.stderr[-3000:]
    assert "resumed from round 1" in q.stdout
    assert results_bytes(wd) == results_bytes(tiny_reference[0])
    assert rounds_logged(wd) == [1, 2, 3, 4]


def test_async_and_sync_runs_write_the_same_checkpoints(tiny_reference, tiny_cache, tmp_path):
    """The uninterrupted run with synchronous saves: the same results and checkpoint arrays as the
    asynchronous reference run (async is configs/base.py's default), bit for bit."""
    from comigs_jax.experiment.checkpoint import RunCheckpoints
    ref = tiny_reference[0]
    wd = str(tmp_path / "sync")
    p = main([TINY, f"--workdir={wd}", "--config.checkpoint.async_save=False"], tiny_cache)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert results_bytes(wd) == results_bytes(ref)
    assert ckpt_rounds(wd) == ckpt_rounds(ref) == [2, 4]
    for r in (2, 4):
        a = RunCheckpoints(os.path.join(ref, "checkpoints")).manager.restore(r)
        b = RunCheckpoints(os.path.join(wd, "checkpoints")).manager.restore(r)
        assert a.meta["fingerprint"] == b.meta["fingerprint"]
        jax.tree.map(np.testing.assert_array_equal, dict(a.state), dict(b.state))


def test_checkpoint_bench_times_each_way_on_one_state(tmp_path, capsys):
    """`experiments.bench --config.checkpoints=...`: one row per way on the same state (its size
    the users' state arrays: U x the per-user leaves), ratios to sync, no checkpoint left behind."""
    from experiments import bench
    from test_bench import SMALL
    out = tmp_path / "b"
    argv = ["experiments.bench", *SMALL, "--config.users=2", "--config.checkpoints=none,sync,async",
            "--config.checkpoint_rounds=2", f"--config.out_dir={out}"]
    assert bench.main(argv) == 0, capsys.readouterr().err[-2000:]
    import json

    from comigs_jax.capacity import workload
    from configs.bench import get_config
    cfg = get_config()
    cfg.tiny.pretrain.n_layer, cfg.tiny.train.seq_len = 1, 64
    w = workload.build_workload("tiny", cfg.tiny, 2, "comigs", "float32", 0)
    want = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(w.states0)) / 2**20
    rows = json.load(open(out / "bench_checkpoints.json"))["rows"]
    assert [r["way"] for r in rows] == ["none", "sync", "async"]
    assert all(r["users"] == 2 and len(r["round_s_all"]) == 2 for r in rows)
    assert all(r["state_mib"] == pytest.approx(want, rel=1e-12) for r in rows)
    assert rows[1]["round_vs_sync"] == 1.0
    assert not os.listdir(out / "checkpoint_bench")
    assert "| tiny | 2 |" in (out / "bench_checkpoints.md").read_text()


def test_async_save_must_be_a_bool():
    """A config built in Python (no flag parsing to type-check it) names the key and what is allowed."""
    import ml_collections

    from comigs_jax import configuration
    from configs import tiny
    cfg = tiny.get_config()
    cfg.checkpoint = ml_collections.ConfigDict(dict(cfg.checkpoint.to_dict(), async_save="yes"))
    with pytest.raises(configuration.ConfigError, match=r"^config\.checkpoint\.async_save='yes' is not allowed: True"):
        configuration.validate(cfg)
