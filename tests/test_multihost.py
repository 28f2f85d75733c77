"""Several JAX processes (gloo collectives, fake CPU devices) equal one process: the pod path. The
engine and the launcher here; experiments.run's pairs in tests/test_multihost_run.py (a file of its
own: the two halves each take minutes, and pytest-xdist hands out whole files)."""
import json
import os
import subprocess
import sys

import multihost_pair
import numpy as np
import procenv
import pytest
from tiny import TOL64

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory):
    single, multi = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("multi")
    import multihost_worker  # the reference in this process: one process, the tests' 8 fake devices
    multihost_worker.main(str(single))
    p = subprocess.run([sys.executable, "-m", "experiments.launch_local", "--processes", "2",
                        "--devices-per-process", "4", "--module", "tests.multihost_worker", "--timeout", "150",
                        "--", str(multi), "1"], cwd=REPO, env=procenv.env(1), capture_output=True, text=True, timeout=300)
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
        np.testing.assert_allclose(b[k], a[k], **TOL64, err_msg=k)


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
                        "--devices-per-process", "1", "--module", "tests.launch_probe", "--timeout", "500"],
                       cwd=REPO, env=procenv.env(1), capture_output=True, text=True, timeout=550)
    assert p.returncode == 3  # process 1's code
    assert "launch_local: process 1 exited with code 3" in p.stderr and "probe: process 1 fails" in p.stderr
    # process 0 (10 minutes' sleep, the launcher's timeout 500 s) was stopped, not waited for: the
    # bound leaves minutes for two Python start-ups on a loaded machine
    assert time.time() - t0 < 300


# ----------------------------------------------------------------------------- experiments.run
def test_a_failing_process_ends_the_run_instead_of_hanging(tmp_path):
    """Process 1 alone cannot load its base: it says why and exits at once, rather than waiting
    in jax.distributed's shutdown barrier for process 0, which waits in a collective for it."""
    import time
    procs = multihost_pair.start_pair(tmp_path / "run", tmp_path / "cache", tmp_path,
                                      extra=((), ("--config.base=/nonexistent/gpt2",)))
    try:
        t0 = time.time()
        code1 = procs[1].wait(timeout=300)  # a hang waits forever: any bound tells; this one load cannot reach
        elapsed = time.time() - t0
    finally:
        for q in procs:
            if q.poll() is None:
                os.killpg(q.pid, 9)
        multihost_pair.wait(procs)
    log1 = (tmp_path / "process1.log").read_text()
    assert code1 == 1, multihost_pair.logs(tmp_path)
    assert "error: " in log1 and "/nonexistent/gpt2" in log1 and "exiting without waiting" in log1, log1
    assert elapsed < 300, elapsed
