"""Several JAX processes (gloo collectives, fake CPU devices) equal one process: the pod path."""
import json
import os
import signal
import stat
import subprocess
import sys

import numpy as np
import procenv
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(devices):
    return procenv.env(devices)


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory):
    single, multi = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("multi")
    import multihost_worker  # the reference in this process: one process, the tests' 8 fake devices
    multihost_worker.main(str(single))
    p = subprocess.run([sys.executable, "-m", "experiments.launch_local", "--processes", "2",
                        "--devices-per-process", "4", "--module", "tests.multihost_worker", "--timeout", "150",
                        "--", str(multi), "1"], cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return single, multi


def test_two_processes_equal_one_process(engine_runs):
    """12 users padded to 16 on 2 x 4 devices, each device's 2 users in chunks of 1: same per-user
    losses, evaluations and final params as 1 x 8, all users at once."""
    single, multi = engine_runs
    a, b = np.load(single / "result.npz"), np.load(multi / "result.npz")
    assert a["losses"].shape == (2, 12, 3)  # rounds, users, steps
    assert sorted(a.files) == sorted(b.files) and len(a.files) > 5
    for k in a.files:
        np.testing.assert_allclose(b[k], a[k], atol=1e-5, err_msg=k)


def test_each_process_holds_only_its_users(engine_runs):
    _, multi = engine_runs
    reports = [json.load(open(multi / f"process{i}.json")) for i in range(2)]
    assert [r["devices"] for r in reports] == [4, 4]
    assert reports[0]["local_rows"] == list(range(8)) and reports[1]["local_rows"] == list(range(8, 16))
    assert reports[0]["users"] == list(range(8)) and reports[1]["users"] == [8, 9, 10, 11]
    for r in reports:  # 4 local devices x 2 users each; nothing of the other process's users
        assert r["shards"]["train"] == [[2, 400]] * 4 and r["shards"]["valid"] == [[2, 200]] * 4


def test_launcher_stops_every_process_when_one_fails(tmp_path):
    import time
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "experiments.launch_local", "--processes", "2",
                        "--devices-per-process", "1", "--module", "tests.launch_probe", "--timeout", "120"],
                       cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=200)
    assert p.returncode == 3  # process 1's code
    assert "launch_local: process 1 exited with code 3" in p.stderr and "probe: process 1 fails" in p.stderr
    assert time.time() - t0 < 30  # process 0 (a minute's sleep) was stopped, not waited for


# ----------------------------------------------------------------------------- experiments.run
RUN_ARGS = ["--config=configs/tiny.py", "--config.data.n_users=12", "--config.train.rounds=2",
            "--config.checkpoint.every_rounds=1", "--config.output.figures=False"]


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_pair(workdir, cache, log_dir, extra=((), ())):
    """Two experiments.run processes x 4 fake devices, as two hosts of a pod (logs kept apart;
    extra[i]: more arguments for process i)."""
    port, procs = _free_port(), []
    for i in range(2):
        env = dict(_env(4), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
        log = open(log_dir / f"process{i}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "experiments.run", *RUN_ARGS, f"--workdir={workdir}",
                                       f"--config.data.cache_dir={cache}", *extra[i]], cwd=REPO, env=env,
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def _wait(procs, timeout=300):
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)


def _logs(log_dir) -> str:
    """Both processes' log tails, and their native stacks where _dump_stacks took them."""
    out = ""
    for i in range(2):
        out += f"\n--- process {i} ---\n" + (log_dir / f"process{i}.log").read_text()[-3000:]
        stack = log_dir / f"process{i}.stack"
        if stack.exists():
            out += f"\n--- process {i}, native stacks ---\n" + stack.read_text()[-3000:]
    return out


def _pair(wd, cache, log_dir, kill_at_checkpoint: bool, timeout=150):
    """One 2-process launch that must, within the timeout, finish (or, with kill_at_checkpoint,
    write its round-1 checkpoint, and then both processes are SIGKILLed). A stall fails with
    both processes' logs and stacks."""
    import time
    procs = _start_pair(wd, cache, log_dir)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if kill_at_checkpoint and (wd / "checkpoints" / "1").is_dir():  # complete: orbax renames
                return
            codes = [q.poll() for q in procs]
            if any(c not in (None, 0) for c in codes):  # one failed: no need to wait for the other
                raise AssertionError(f"exit codes {codes}:" + _logs(log_dir))
            if all(c is not None for c in codes):
                assert not kill_at_checkpoint, "finished before the kill" + _logs(log_dir)
                return
            time.sleep(0.05)
        _dump_stacks(procs, log_dir)
        raise AssertionError(f"2-process run stalled for {timeout} s:" + _logs(log_dir))
    finally:
        for q in procs:
            if q.poll() is None:
                os.killpg(q.pid, 9)
        _wait(procs)


def _dump_stacks(procs, log_dir):
    """Where each process of a stalled pair waits: Python stacks (faulthandler, SIGUSR1) into its
    log, and native stacks (process<i>.stack) when py-spy is installed."""
    import shutil
    import time
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=os.path.dirname(sys.executable))
    for i, q in enumerate(procs):
        if q.poll() is None:
            if spy:
                out = subprocess.run([spy, "dump", "--native", "--pid", str(q.pid)], capture_output=True,
                                     text=True, timeout=60)
                (log_dir / f"process{i}.stack").write_text(out.stdout + out.stderr)
            os.kill(q.pid, signal.SIGUSR1)
    time.sleep(2)


def _run_here(args):
    """experiments.run in this process (one process, the tests' 8 fake devices): the reference."""
    from experiments import run as run_cli
    return run_cli.main(["experiments.run", *RUN_ARGS, *args])


@pytest.fixture(scope="module")
def run_pair(tmp_path_factory):
    """A single-process run (8 devices), and the same run on 2 processes x 4 devices that is
    killed (SIGKILL, both processes) once its round-1 checkpoint exists and then relaunched."""
    cache, root = tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("runs")
    single = root / "single"
    assert _run_here([f"--workdir={single}", f"--config.data.cache_dir={cache}"]) == 0
    multi = root / "multi"
    _pair(multi, cache, root, kill_at_checkpoint=True)
    killed_before_results = not (multi / "results.json").exists()
    _pair(multi, cache, root, kill_at_checkpoint=False)  # the relaunch resumes
    return single, multi, root, killed_before_results, cache


def _users(wd):
    return json.load(open(wd / "results.json"))["users"]


def test_experiments_run_on_two_processes_equals_one(run_pair):
    """Also after both processes were killed past checkpoint 1 and relaunched (a pod restart)."""
    single, multi, root, killed_before_results, _ = run_pair
    assert killed_before_results
    assert "resumed from round" in (root / "process0.log").read_text()
    a, b = _users(single), _users(multi)
    assert [u["user"] for u in b] == [f"user{i}" for i in range(12)]
    for x, y in zip(a, b):
        for k in ("test_ppl", "test_ppl_post_aggregation", "bayes_ppl", "generalist_share"):
            assert y[k] == pytest.approx(x[k], rel=1e-5), k
    hosts = json.load(open(multi / "hosts.json"))  # each process loaded only its own users
    assert [h["users"] for h in hosts] == [list(range(8)), list(range(8, 12))]
    assert all(len(h["devices"]) == 4 for h in hosts)
    # Only process 0 speaks: process 1's output is the gloo library's connection lines alone
    # (written from several threads, so they may interleave: compare the words).
    import re
    words = set(re.findall(r"[A-Za-z]+", (root / "process1.log").read_text()))
    assert words and words <= {"Gloo", "Rank", "is", "connected", "to", "peer", "ranks", "Expected", "number", "of"}, words
    assert "| **mean** |" in (root / "process0.log").read_text()
    # Process 1 wrote no file: not even through a stand-in path (an atomic rewrite of os.devnull,
    # as root, once replaced the device with a regular file and broke later runs).
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)
    assert [r["round"] for r in map(json.loads, open(multi / "metrics.jsonl"))] == [1, 2]


def test_two_processes_fall_back_from_a_corrupt_checkpoint(run_pair, tmp_path):
    """The latest checkpoint's arrays cut short: both processes fall back to round 1, process 0
    alone sets the corrupt one aside, and the run ends as the uninterrupted one did."""
    import glob
    import shutil
    single, multi, _, _, cache = run_pair
    wd = tmp_path / "corrupt"
    shutil.copytree(multi, wd)
    (wd / "results.json").unlink()
    files = glob.glob(str(wd / "checkpoints" / "2" / "state" / "**" / "d" / "*"), recursive=True)
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(7)
    _pair(wd, cache, tmp_path, kill_at_checkpoint=False)
    log0 = (tmp_path / "process0.log").read_text()
    assert "checkpoint of round 2 is corrupt" in log0 and "resumed from round 1" in log0, log0
    assert len(os.listdir(wd / "checkpoints_corrupt")) == 1
    for x, y in zip(_users(single), _users(wd)):
        assert y["test_ppl"] == pytest.approx(x["test_ppl"], rel=1e-5)


def test_a_failing_process_ends_the_run_instead_of_hanging(tmp_path):
    """Process 1 alone cannot load its base: it says why and exits at once, rather than waiting
    in jax.distributed's shutdown barrier for process 0, which waits in a collective for it."""
    import time
    procs = _start_pair(tmp_path / "run", tmp_path / "cache", tmp_path,
                        extra=((), ("--config.base=/nonexistent/gpt2",)))
    try:
        t0 = time.time()
        code1 = procs[1].wait(timeout=120)
        elapsed = time.time() - t0
    finally:
        for q in procs:
            if q.poll() is None:
                os.killpg(q.pid, 9)
        _wait(procs)
    log1 = (tmp_path / "process1.log").read_text()
    assert code1 == 1, _logs(tmp_path)
    assert "error: " in log1 and "/nonexistent/gpt2" in log1 and "exiting without waiting" in log1, log1
    assert elapsed < 90, elapsed


def test_a_two_process_checkpoint_resumes_on_one_process(run_pair, tmp_path, capsys):
    """A changed topology (2 processes x 4 devices -> 1 x 8): orbax reshards on restore."""
    import shutil
    single, multi, _, _, cache = run_pair
    wd = tmp_path / "moved"
    shutil.copytree(multi, wd)
    shutil.rmtree(wd / "checkpoints" / "2")
    (wd / "results.json").unlink()
    assert _run_here([f"--workdir={wd}", f"--config.data.cache_dir={cache}"]) == 0
    assert "resumed from round 1" in capsys.readouterr().out
    for x, y in zip(_users(single), _users(wd)):
        assert y["test_ppl"] == pytest.approx(x["test_ppl"], rel=1e-5)
