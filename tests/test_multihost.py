"""Several JAX processes (gloo collectives, fake CPU devices) equal one process: the pod path."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(devices):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    return env


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory):
    single, multi = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("multi")
    p = subprocess.run([sys.executable, "tests/multihost_worker.py", str(single)], cwd=REPO, env=_env(8),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    p = subprocess.run([sys.executable, "-m", "experiments.launch_local", "--processes", "2",
                        "--devices-per-process", "4", "--module", "tests.multihost_worker", "--timeout", "240",
                        "--", str(multi)], cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return single, multi


def test_two_processes_equal_one_process(engine_runs):
    """12 users padded to 16 on 2 x 4 devices: same per-user losses and final params as 1 x 8."""
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
    p = subprocess.run([sys.executable, "-m", "experiments.launch_local", "--processes", "2",
                        "--devices-per-process", "1", "--module", "tests.multihost_worker", "--timeout", "120",
                        "--", str(tmp_path / "missing" / "dir")], cwd=REPO, env=_env(1),
                       capture_output=True, text=True, timeout=200)
    assert p.returncode != 0
    assert "launch_local: process" in p.stderr and "exited with code" in p.stderr
