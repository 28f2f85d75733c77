"""Reliability (issue 8): kills and resumption, signals, bad configs, bad data, bad checkpoints,
numerical faults, untrusted inputs. The entry point runs on configs/tiny.py: in subprocesses where
the process boundary is the point (SIGKILL, SIGTERM/SIGINT, the CLI's own stderr), else its
main(argv) in this process (tests/entrypoint.py; one device, bit for bit a subprocess's run). One
uninterrupted run (conftest.tiny_reference) is the reference every interrupted run must reproduce
bit for bit."""
import glob
import json
import os
import pickle
import random
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from entrypoint import REPO, main, start
from entrypoint import run as run_subprocess
TINY = "--config=configs/tiny.py"


def rounds_logged(wd):
    return [json.loads(l)["round"] for l in open(os.path.join(wd, "metrics.jsonl")) if l.strip()]


TIMING_KEYS = ("speed", "provenance")  # wall-clock timings, and when and where it ran: all of results.json that may differ


def results_bytes(wd):
    """results.json, bit for bit, less its wall-clock timings (every value serialised exactly)."""
    with open(os.path.join(wd, "results.json")) as f:
        res = json.load(f)
    return json.dumps({k: v for k, v in res.items() if k not in TIMING_KEYS}, indent=1).encode()


def ckpt_rounds(wd):
    d = os.path.join(wd, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


@pytest.fixture
def cache(tiny_cache):
    return tiny_cache


@pytest.fixture
def reference(tiny_reference):
    """The uninterrupted run every interrupted one must reproduce."""
    wd = tiny_reference[0]
    assert ckpt_rounds(wd) == [2, 4]
    return wd


run = main  # experiments.run's main(argv) in this process, answering as a subprocess run would

# XLA compiles in this process (jax.monitoring): "fails at once, before any compile work" is
# checked as a count, which does not depend on the machine's speed or load as wall time does.
_COMPILES = [0]
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: _COMPILES.__setitem__(0, _COMPILES[0] + event.startswith("/jax/core/compile")))


def _copy_run(reference, dest, drop_results=True):
    shutil.copytree(reference, dest)
    if drop_results:
        for f in ("results.json", "results.md"):
            os.remove(os.path.join(dest, f))
    return dest


# ----------------------------------------------------------------------------- 1. kill and resume
def test_sigkill_at_a_random_moment_then_resume_is_bit_identical(reference, cache, tmp_path):
    wd = str(tmp_path / "killed")
    delay = random.Random().uniform(0.0, 1.5)
    p = start([TINY, f"--workdir={wd}"], cache)
    t0 = time.time()
    while not os.path.isdir(os.path.join(wd, "checkpoints", "2")):  # the first complete checkpoint
        assert p.poll() is None, p.stdout.read()[-3000:]
        assert time.time() - t0 < 240
        time.sleep(0.005)
    time.sleep(delay)
    p.kill()  # SIGKILL: no handler runs
    p.wait()
    state = (ckpt_rounds(wd), os.path.exists(os.path.join(wd, "results.json")))
    print(f"killed {delay:.3f} s after checkpoint 2 existed: checkpoints {state[0]}, results.json {state[1]}")
    q = run([TINY, f"--workdir={wd}"], cache)
    assert q.returncode == 0, q.stdout[-3000:] + q.stderr[-3000:]
    assert results_bytes(wd) == results_bytes(reference)
    assert rounds_logged(wd) == [1, 2, 3, 4]


def test_kill_during_a_checkpoint_write_is_never_taken_for_a_checkpoint(reference, cache, tmp_path):
    """Killed while writing round 4's checkpoint: orbax's temporary folder holds part of it."""
    wd = _copy_run(reference, str(tmp_path / "mid_write"))
    ck = os.path.join(wd, "checkpoints")
    tmp = os.path.join(ck, "4.orbax-checkpoint-tmp-1700000000000000")
    os.rename(os.path.join(ck, "4"), tmp)
    for f in sorted(glob.glob(os.path.join(tmp, "state", "**", "d", "*"), recursive=True))[::2]:
        with open(f, "r+b") as fh:  # half the array files cut short, as a write in progress
            fh.truncate(os.path.getsize(f) // 3)
    os.remove(os.path.join(tmp, "meta", "metadata"))
    with open(os.path.join(wd, "metrics.jsonl"), "a") as f:  # and a metrics line cut short
        f.write('{"round": 5, "train_lo')
    p = run([TINY, f"--workdir={wd}"], cache)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "resumed from round 2" in p.stdout
    assert results_bytes(wd) == results_bytes(reference)
    assert not glob.glob(os.path.join(ck, "*orbax-checkpoint-tmp*"))  # the partial write was removed
    assert ckpt_rounds(wd) == [2, 4] and rounds_logged(wd) == [1, 2, 3, 4]


def test_killed_after_the_last_checkpoint_finishes_the_outputs(reference, cache, tmp_path):
    """Killed after the final checkpoint but before results.json: the rerun writes the same results."""
    wd = _copy_run(reference, str(tmp_path / "after_last"))
    p = run([TINY, f"--workdir={wd}"], cache)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "the run had finished; writing its outputs" in p.stdout
    assert results_bytes(wd) == results_bytes(reference)


# ----------------------------------------------------------------------------- 2. signals
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_after_the_round_with_a_checkpoint_and_resume_line(sig, reference, cache, tmp_path):
    wd = str(tmp_path / f"sig{int(sig)}")
    p = start([TINY, f"--workdir={wd}"], cache)
    out = []
    for line in p.stdout:
        out.append(line)
        if "rounds 1..4" in line:  # the loop is live; round 1 is compiling
            p.send_signal(sig)
    rc = p.wait()
    text = "".join(out)
    assert rc == 128 + int(sig), text[-3000:]
    assert f"stopped by {signal.Signals(sig).name} at the end of round 1 of 4" in text
    assert ckpt_rounds(wd) == [1] and rounds_logged(wd) == [1]
    line = next(l for l in out if "resume with:" in l)
    resume = line.split("resume with: ", 1)[1].split()
    assert resume[:3] == ["python", "-m", "experiments.run"] and f"--workdir={wd}" in resume
    if sig == signal.SIGINT:  # the same stop path; one resumption (SIGTERM's) is enough
        return
    q = main(resume[3:])  # the printed command's arguments, through the same entry point
    assert q.returncode == 0, q.stdout[-3000:] + q.stderr[-3000:]
    assert "resumed from round 1" in q.stdout
    assert results_bytes(wd) == results_bytes(reference)


# ----------------------------------------------------------------------------- 5. bad checkpoints
def _corrupt_arrays(ckpt_dir):
    files = sorted(glob.glob(os.path.join(ckpt_dir, "state", "**", "d", "*"), recursive=True))
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(7)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(reference, cache, tmp_path):
    wd = _copy_run(reference, str(tmp_path / "corrupt_latest"))
    _corrupt_arrays(os.path.join(wd, "checkpoints", "4"))
    p = run([TINY, f"--workdir={wd}"], cache)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "checkpoint of round 4 is corrupt" in p.stdout and "falling back to round 2" in p.stdout
    assert "resumed from round 2" in p.stdout
    assert results_bytes(wd) == results_bytes(reference)
    assert len(os.listdir(os.path.join(wd, "checkpoints_corrupt"))) == 1  # kept for inspection


def test_no_restorable_checkpoint_is_an_error_not_a_restart(reference, cache, tmp_path):
    wd = _copy_run(reference, str(tmp_path / "all_corrupt"))
    for r in (2, 4):
        _corrupt_arrays(os.path.join(wd, "checkpoints", str(r)))
    before = open(os.path.join(wd, "metrics.jsonl")).read()
    p = run_subprocess([TINY, f"--workdir={wd}"], cache)  # the process's whole stderr: a subprocess
    assert p.returncode != 0
    # one line, and no traceback of tensorstore's abandoned reads around it
    assert "Traceback" not in p.stderr and "Event loop is closed" not in p.stderr, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no checkpoint in") and "round 4:" in last and "round 2:" in last
    assert "--config.resume=False" in last
    assert ckpt_rounds(wd) == [2, 4] and open(os.path.join(wd, "metrics.jsonl")).read() == before


def test_checkpoint_of_another_config_is_refused(reference, cache, tmp_path):
    """Checkpoints copied under a run of another config (config.json gone): the identity stored in
    each checkpoint names the difference."""
    wd = _copy_run(reference, str(tmp_path / "other"))
    os.remove(os.path.join(wd, "config.json"))
    p = run([TINY, f"--workdir={wd}", "--config.model.rank=2"], cache)
    assert p.returncode != 0
    last = p.stderr.strip().splitlines()[-1]
    assert "belongs to a run of another config (model.rank: 4 there, 2 now)" in last, p.stderr[-2000:]
    assert ckpt_rounds(wd) == [2, 4]


def _toy_state(users=3, rank=4):
    k = jax.random.PRNGKey(0)  # raw uint32 keys, as the run's states hold
    return {"params": {"a": jax.random.normal(k, (users, 8, rank)), "b": jnp.zeros((users, rank), jnp.bfloat16)},
            "step": jnp.arange(users, dtype=jnp.int32), "key": jax.random.split(k, users)}


@pytest.mark.parametrize("change,expect", [
    (dict(users=4), r"\['key'\] is uint32\[3, 2\] there, uint32\[4, 2\] now"),
    (dict(rank=2), r"\['params'\]\['a'\] is float32\[3, 8, 4\] there, float32\[3, 8, 2\] now"),
    ("extra_leaf", r"it lacks \['params'\]\['c'\]"),
])
def test_checkpoint_of_another_model_shape_is_a_one_line_error(change, expect, tmp_path):
    from comigs_jax.experiment.checkpoint import CheckpointError, RunCheckpoints
    c = RunCheckpoints(str(tmp_path / "ck"))
    c.save(2, _toy_state(), {"round": 2})
    if change == "extra_leaf":
        other = _toy_state()
        other["params"]["c"] = jnp.ones((3, 2))
    else:
        other = _toy_state(**change)
    with pytest.raises(CheckpointError, match=expect) as e:
        RunCheckpoints(str(tmp_path / "ck")).restore_latest(other)
    assert "\n" not in str(e.value)


def test_fingerprint_catches_arrays_that_read_back_different(tmp_path):
    """A checkpoint whose arrays read back fine but differ from what was saved (a silent bit flip)."""
    import orbax.checkpoint as ocp

    from comigs_jax.experiment.checkpoint import RunCheckpoints, _flat, fingerprint
    c = RunCheckpoints(str(tmp_path / "ck"))
    good = _toy_state()
    c.save(1, good, {"round": 1})
    flipped = jax.tree.map(lambda x: x, good)
    flipped["params"]["a"] = flipped["params"]["a"].at[1, 2, 3].set(7.0)
    c.manager.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave(_flat(flipped)),
                                              meta=ocp.args.JsonSave({"round": 2, "fingerprint": fingerprint(good)})))
    c.manager.wait_until_finished()
    logs = []
    r, state, meta = RunCheckpoints(str(tmp_path / "ck")).restore_latest(good, log=logs.append)
    assert r == 1 and meta["round"] == 1
    assert any("round 2 is corrupt (its arrays do not match the fingerprint" in l for l in logs)
    np.testing.assert_array_equal(state["params"]["a"], good["params"]["a"])


# ----------------------------------------------------------------------------- 6. numerical faults
def test_huge_learning_rate_stops_with_round_user_step_and_no_checkpoint(cache, tmp_path):
    wd = str(tmp_path / "nan")
    p = run([TINY, f"--workdir={wd}", "--config.train.lr=1e30", "--config.checkpoint.every_rounds=1"], cache)
    assert p.returncode != 0
    last = p.stderr.strip().splitlines()[-1]
    assert "non-finite training metric" in last and "round 1, user 0 (user0), step 2 of 3" in last, p.stderr[-2000:]
    assert "no checkpoint of this state was written" in last
    assert ckpt_rounds(wd) == [] and rounds_logged(wd) == []  # checkpoint every round, yet none of round 1


def test_nonfinite_metric_locator():
    from comigs_jax.experiment.numerics import first_nonfinite
    m = {"loss": np.ones((3, 4), np.float32), "ce": np.ones((3, 4), np.float32),
         "router_prob": np.ones((3, 4, 2, 2), np.float32), "router_phase": np.ones((3, 4), bool)}
    assert first_nonfinite(m, np.ones(3, bool)) is None
    m["router_prob"][2, 1, 0, 1] = np.inf
    m["ce"][1, 3] = np.nan
    assert first_nonfinite(m, np.ones(3, bool)) == (1, 2, "router_prob", np.inf)
    assert first_nonfinite(m, np.array([True, True, False])) == (3, 1, "ce", pytest.approx(np.nan, nan_ok=True))
    assert first_nonfinite(m, np.array([True, False, False])) is None  # users sitting out the round


# ----------------------------------------------------------------------------- 3. bad configuration
def _base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("base32")
    json.dump({"model_type": "gpt2", "vocab_size": 64, "n_positions": 32, "n_embd": 32, "n_layer": 1,
               "n_head": 2}, open(d / "config.json", "w"))
    return str(d)


BAD_CONFIGS = [  # (overrides, the key and what the one line must name)
    (["--config.model.top_k=3"], "config.model.top_k=3 is not allowed: in [1, 2]"),
    (["--config.model.n_experts=4", "--config.model.top_k=5"], "config.model.top_k=5 is not allowed: in [1, 4]"),
    (["--config.model.n_generalists=2"], "config.model.n_generalists=2 is not allowed: in [0, 1]"),
    (["--config.model.expert_counts=2,3"], "config.model.expert_counts='2,3' is not allowed: 3 entries"),
    (["--config.model.expert_counts=2,3,3,3"], "config.model.expert_counts='2,3,3,3' is not allowed: 3 entries"),
    (["--config.model.rank=0"], "config.model.rank=0 is not allowed: a positive integer"),
    (["--config.model.rank=-4"], "config.model.rank=-4 is not allowed: a positive integer"),
    (["--config.train.lr=0"], "config.train.lr=0.0 is not allowed: a positive finite number"),
    (["--config.train.lr=-0.001"], "config.train.lr=-0.001 is not allowed: a positive finite number"),
    (["--config.train.router_lr=-1"], "config.train.router_lr=-1.0 is not allowed: a positive finite number"),
    (["--config.train.lr=nan"], "config.train.lr=nan is not allowed: a positive finite number"),
    (["--config.train.seq_len=64", "--config.base={base32}"], "config.train.seq_len=64 is not allowed: at most the base's 32 positions"),
    (["--config.method=scaffold"], "config.method='scaffold' is not allowed: one of"),
    (["--config.methods=local,scaffold"], "config.methods='scaffold' is not allowed: one of"),
    (["--config.method=fedprox"], "config.train.prox_mu=0.0 is not allowed: > 0 for method fedprox"),
    (["--config.server.lr=0"], "config.server.lr=0.0 is not allowed: a positive finite number"),
    (["--config.server.optimizer=adamw"], "config.server.optimizer='adamw' is not allowed: none | sgd | adam | yogi"),
    (["--config.data.source=imagenet"], "data.source='imagenet' is not allowed: one of synthetic"),
    (["--config=configs/agnews.py", "--config.data.categories=World,Weather"], "unknown category 'Weather'; valid: World, Sports"),
    (["--config=configs/wikipedia.py", "--config.data.categories=de,xx"], "unknown language 'xx'"),
    (["--config.train.router_every=0"], "config.train.router_every=0 is not allowed: a positive integer"),
    (["--config.train.router_every=-3"], "config.train.router_every=-3 is not allowed: a positive integer"),
    (["--config.data.n_users=0"], "config.data.n_users=0 is not allowed: at least 1 user"),
    (["--config.train.user_chunk=-2"], "config.train.user_chunk=-2 is not allowed: an integer >= 0"),
    (["--config.model.remat=full"], "config.model.remat='full' is not allowed: one of ('none', 'block', 'moe')"),
    (["--config.train.seq_len=4000"], "config.data.train_tokens=3000 is not allowed: at least one window"),
    (["--config.checkpoint.max_to_keep=0"], "config.checkpoint.max_to_keep=0 is not allowed"),
    (["--config.pretrain.n_head=3"], "config.pretrain.n_head=3 is not allowed: a divisor of pretrain.n_embd=32"),
    (["--config.train.rounds=2.5"], "error:"),  # a float for an int key: the flag parser's line
]


@pytest.fixture(scope="module")
def base32(tmp_path_factory):
    return _base_dir(tmp_path_factory)


@pytest.mark.parametrize("args,message", BAD_CONFIGS, ids=[" ".join(a).replace("--config.", "") for a, _ in BAD_CONFIGS])
def test_bad_config_fails_at_once_with_one_line(args, message, base32, tmp_path):
    args = [a.replace("{base32}", base32) for a in args]
    if not any(a.startswith("--config=") for a in args):
        args = [TINY, *args]
    wd, cache = tmp_path / "wd", tmp_path / "cache"
    compiles = _COMPILES[0]
    p = run([*args, f"--workdir={wd}"], str(cache))
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], p.stderr[-2000:]
    assert not wd.exists() and not cache.exists()  # no data, base or run work was done ...
    assert _COMPILES[0] == compiles  # ... and nothing was compiled


@pytest.mark.parametrize("args,message", [BAD_CONFIGS[0], BAD_CONFIGS[-1]], ids=["model.top_k=3", "train.rounds=2.5"])
def test_bad_config_on_the_command_line_is_one_stderr_line(args, message, tmp_path):
    """The same as above through `python -m experiments.run` itself: the process's whole stderr
    (import-time warnings, logging, a traceback) is that one line, and it fails before any work
    (no folder; that nothing compiles is the in-process test's count above: a wall-clock bound
    here failed on a loaded machine, 25 s for a second's work)."""
    wd, cache = tmp_path / "wd", tmp_path / "cache"
    p = run_subprocess([TINY, *args, f"--workdir={wd}"], str(cache), timeout=120)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], p.stderr[-2000:]
    assert not wd.exists() and not cache.exists()


def test_more_devices_than_users_is_fine():
    """3 users on the 8 fake devices of the test process: padded to 8, masked out; train and evaluate."""
    from comigs_jax.federated.methods import get_method
    from comigs_jax.federated.layout import Layout
    from comigs_jax.federated.sharding import users_mesh
    from comigs_jax.experiment.simulation import Simulation
    from comigs_jax.train.state import TrainConfig
    from tiny import markov_users, tiny_base, tiny_cfg

    assert jax.device_count() == 8
    cfg = tiny_cfg()
    tc = TrainConfig(rounds=1, local_steps=2, batch_size=4, seq_len=8, router_every=2, router_steps=1)
    train, valid = markov_users(3, 400), markov_users(3, 200, seed=1)
    sim = Simulation(cfg, tc, get_method("comigs"), tiny_base(cfg), train, valid, seed=0,
                     layout=Layout(3, users_mesh()))
    assert sim.n_padded == 8
    m = sim.run_round()
    sim.aggregate()
    assert m["ce"].shape[0] == 3 and np.isfinite(m["ce"]).all()
    ev = sim.evaluate(valid, 8, 4)
    assert ev["ce"].shape == (3,) and np.isfinite(ev["ce"]).all()


# ----------------------------------------------------------------------------- 4. bad data
WORDS = "der die das und ist nicht ein eine mit auf für von dem den".split()


def _corpus(root, cats=("a", "b"), n_docs=60):
    for cat in cats:
        os.makedirs(os.path.join(root, cat), exist_ok=True)
        r = random.Random(cat)
        paras = [f"Q{cat}{n}Q " + " ".join(r.choice(WORDS) for _ in range(r.randint(20, 50))) for n in range(n_docs)]
        with open(os.path.join(root, cat, "part.txt"), "w") as f:
            f.write("\n\n".join(paras) + "\n")
    return root


def _data_cfg(root, cache, **kw):
    from comigs_jax.data import default_data_config
    c = default_data_config()
    c.source, c.text_files.root, c.cache_dir, c.progress, c.n_users = "text_files", root, str(cache), False, 2
    c.train_tokens, c.valid_tokens, c.test_tokens = 1000, 300, 300
    for k, v in kw.items():
        c[k] = v
    return c


def test_empty_files_are_ignored_and_an_empty_user_is_named(tmp_path):
    from comigs_jax.data import InsufficientDataError, load_user_data
    root = _corpus(str(tmp_path / "c"))
    ref = load_user_data(_data_cfg(root, tmp_path / "k1"))
    open(os.path.join(root, "a", "empty.txt"), "w").close()
    again = load_user_data(_data_cfg(root, tmp_path / "k2"))
    for x, y in zip(ref.train, again.train):
        np.testing.assert_array_equal(x, y)
    os.makedirs(os.path.join(root, "z"))
    open(os.path.join(root, "z", "empty.txt"), "w").close()
    with pytest.raises(InsufficientDataError, match=r"user 0 \(z\): train split needs 1000 tokens of 'z' but the source provided only 0"):
        load_user_data(_data_cfg(root, tmp_path / "k3", categories="z", n_users=1))


def test_user_with_fewer_tokens_than_one_window(tmp_path):
    from comigs_jax.data import InsufficientDataError, load_user_data
    root = _corpus(str(tmp_path / "c"), n_docs=2)
    with pytest.raises(InsufficientDataError, match=r"user \d \(\w\): \w+ split has \d+ tokens, fewer than one window"):
        load_user_data(_data_cfg(root, tmp_path / "k", allow_fewer_tokens=True, min_tokens=200))


def test_non_utf8_bytes_name_the_file(tmp_path, cache):
    from comigs_jax.data import DataSourceError, load_user_data
    root = _corpus(str(tmp_path / "c"))
    bad = os.path.join(root, "b", "latin1.txt")
    with open(bad, "wb") as f:
        f.write("caf\xe9 d\xe9j\xe0 vu\n".encode("latin-1"))
    with pytest.raises(DataSourceError, match=rf"category 'b': {bad} is not UTF-8 \(byte 0xe9 at offset 3\)"):
        load_user_data(_data_cfg(root, tmp_path / "k"))
    # through the entry point: one line, no traceback
    p = run(["--config=configs/local_text.py", f"--config.data.text_files.root={root}", "--config.data.n_users=2", "--config.data.train_tokens=1000", "--config.data.valid_tokens=300",
             "--config.data.test_tokens=300", "--config.data.categories=a,b", "--config.train.seq_len=64",
             f"--workdir={tmp_path / 'wd'}"], str(tmp_path / "k2"))
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and lines[-1].startswith("error: text_files category 'b'") and "Traceback" not in p.stderr


def _truncate(p, blob):
    return blob[: len(blob) - 10]


def _old_version(p, blob):
    return blob.replace(b'"version": 1', b'"version": 0', 1)


def _flip_payload(p, blob):
    b = bytearray(blob)
    b[-5] ^= 0x55
    return bytes(b)


def _garbage(p, blob):
    return b"\x00" * len(blob)


def _empty(p, blob):
    return b""


def _other_key(p, blob):
    return blob.replace(b'"key": "', b'"key": "0', 1)


@pytest.mark.parametrize("damage", [_truncate, _old_version, _flip_payload, _garbage, _empty, _other_key],
                         ids=lambda f: f.__name__.strip("_"))
def test_damaged_token_cache_is_rebuilt_not_used(damage, tmp_path):
    from comigs_jax.data import load_user_data, tokens
    root = _corpus(str(tmp_path / "c"))
    cfg = _data_cfg(root, tmp_path / "k")
    ref = load_user_data(cfg)
    path = os.path.join(ref.info["cache_dir"], "user00000.tokens")
    blob = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(damage(path, blob))
    assert tokens.read_user_cache(path, ref.info["cache_key"]) is None
    again = load_user_data(cfg)
    assert again.info["cache_hits"] == [1]
    for x, y in zip(ref.train + ref.valid + ref.test, again.train + again.valid + again.test):
        np.testing.assert_array_equal(x, y)
    assert open(path, "rb").read() == blob  # rebuilt to the same bytes


# ----------------------------------------------------------------------------- 7. untrusted inputs
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # runs code when unpickled
        return (open, (self.marker, "w"))


def test_pickled_weights_are_never_unpickled(tmp_path):
    from comigs_jax.model.config import GPT2Config
    from comigs_jax.model.gpt2 import init_params
    from comigs_jax.model.hf import CheckpointError, load_gpt2, save_gpt2
    marker = str(tmp_path / "pwned")
    d = tmp_path / "pickled"
    cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    save_gpt2(init_params(cfg, jax.random.key(0)), cfg, str(d))
    with open(d / "pytorch_model.bin", "wb") as f:
        pickle.dump({"h.0.attn.c_attn.weight": _Payload(marker)}, f)
    load_gpt2(str(d))  # safetensors beside it: the pickle is not even opened
    assert not os.path.exists(marker)
    os.remove(d / "model.safetensors")
    try:
        load_gpt2(str(d))
    except CheckpointError as e:
        assert "never unpickled" in str(e)
    except Exception:  # torch installed: its weights_only loader refuses the payload
        pass
    assert not os.path.exists(marker)


def test_no_remote_code_or_unsafe_deserialisation_in_the_sources():
    offenders = []
    for sub in ("comigs_jax", "experiments", "configs"):
        for path in glob.glob(os.path.join(REPO, sub, "**", "*.py"), recursive=True):
            for i, line in enumerate(open(path, encoding="utf-8"), 1):
                code = line.split("#", 1)[0]
                if ("trust_remote_code" in code or "pickle.load" in code or "allow_pickle=True" in code
                        or ("torch.load(" in code and "weights_only=True" not in code)):
                    offenders.append(f"{os.path.relpath(path, REPO)}:{i}: {line.strip()}")
    assert not offenders, offenders


def test_metrics_writer_without_a_file_keeps_records_in_memory(tmp_path, monkeypatch):
    """The other processes of a multi-process run keep their metrics in memory and open no file."""
    from comigs_jax.experiment.metrics import MetricsWriter
    monkeypatch.chdir(tmp_path)
    w = MetricsWriter(None)
    for r in (1, 2, 3):
        w.write({"round": r, "loss": 0.5 * r})
    w.truncate(2)
    assert w.read() == [{"round": 1, "loss": 0.5}, {"round": 2, "loss": 1.0}]
    assert os.listdir(tmp_path) == []
    f = MetricsWriter(str(tmp_path / "m.jsonl"))  # the file-backed writer reads back the same records
    for r in w.read():
        f.write(r)
    assert f.read() == w.read()


def test_damaged_cached_base_is_pretrained_again(reference, cache, tmp_path):
    """The pretrained base is a cache: a cut-short model.safetensors is reported and rebuilt
    (the same base: the run ends bit for bit as the reference), never a dead end."""
    own = str(tmp_path / "cache")
    shutil.copytree(cache, own)
    (base,) = glob.glob(os.path.join(own, "bases", "pretrained-*", "model.safetensors"))
    with open(base, "r+b") as f:
        f.truncate(os.path.getsize(base) // 2)
    wd = str(tmp_path / "run")
    p = run([TINY, f"--workdir={wd}"], own)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "warning: the cached base cannot be loaded" in p.stdout and "pretraining it again" in p.stdout
    assert results_bytes(wd) == results_bytes(reference)
    from comigs_jax.model.hf import load_gpt2
    load_gpt2(os.path.dirname(base))  # the cache holds a whole base again
