"""experiments.run on two JAX processes (2 x 4 fake CPU devices, gloo) equals one process x 8
devices, through a kill of both processes and their relaunch, a corrupt checkpoint, and a resume on
one process (tests/multihost_pair.py starts the pairs)."""
import json
import os
import stat

import pytest

from multihost_pair import pair, run_here, users
from tiny import TOL64

APPROX = dict(rel=TOL64["rtol"], abs=TOL64["atol"])  # float64 runs (multihost_pair.RUN_ARGS)


@pytest.fixture(scope="module")
def run_pair(tmp_path_factory, tiny_cache):
    """A single-process run (8 devices), and the same run on 2 processes x 4 devices that is
    killed (SIGKILL, both processes) once its round-1 checkpoint exists and then relaunched. The
    session's data cache: configs/tiny.py's base (pretrained in float32 whatever the run's dtype;
    its key leaves out data.n_users) is pretrained once for the session."""
    cache, root = tiny_cache, tmp_path_factory.mktemp("runs")
    single = root / "single"
    assert run_here([f"--workdir={single}", f"--config.data.cache_dir={cache}"]) == 0
    multi = root / "multi"
    pair(multi, cache, root, kill_at_checkpoint=True)
    killed_before_results = not (multi / "results.json").exists()
    pair(multi, cache, root, kill_at_checkpoint=False)  # the relaunch resumes
    return single, multi, root, killed_before_results, cache


def test_experiments_run_on_two_processes_equals_one(run_pair):
    """Also after both processes were killed past checkpoint 1 and relaunched (a pod restart)."""
    single, multi, root, killed_before_results, _ = run_pair
    assert killed_before_results
    assert "resumed from round" in (root / "process0.log").read_text()
    a, b = users(single), users(multi)
    assert [u["user"] for u in b] == [f"user{i}" for i in range(12)]
    for x, y in zip(a, b):
        for k in ("test_ppl", "test_ppl_post_aggregation", "bayes_ppl", "generalist_share"):
            assert y[k] == pytest.approx(x[k], **APPROX), k
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
    pair(wd, cache, tmp_path, kill_at_checkpoint=False)
    log0 = (tmp_path / "process0.log").read_text()
    assert "checkpoint of round 2 is corrupt" in log0 and "resumed from round 1" in log0, log0
    assert len(os.listdir(wd / "checkpoints_corrupt")) == 1
    for x, y in zip(users(single), users(wd)):
        assert y["test_ppl"] == pytest.approx(x["test_ppl"], **APPROX)


def test_a_two_process_checkpoint_resumes_on_one_process(run_pair, tmp_path, capsys):
    """A changed topology (2 processes x 4 devices -> 1 x 8): orbax reshards on restore."""
    import shutil
    single, multi, _, _, cache = run_pair
    wd = tmp_path / "moved"
    shutil.copytree(multi, wd)
    shutil.rmtree(wd / "checkpoints" / "2")
    (wd / "results.json").unlink()
    assert run_here([f"--workdir={wd}", f"--config.data.cache_dir={cache}"]) == 0
    assert "resumed from round 1" in capsys.readouterr().out
    for x, y in zip(users(single), users(wd)):
        assert y["test_ppl"] == pytest.approx(x["test_ppl"], **APPROX)


def test_stacked_seeds_on_two_processes(run_pair, tmp_path):
    """federation.stack_seeds=True on 2 processes x 4 devices: 2 seeds x 12 users are 24 rows, so
    process 1 holds seed 7's users 0..11, whose data a one-seed layout would not give it. Each
    process loads the users of its rows in every program size; the single run's seed comes out."""
    single, _, _, _, cache = run_pair
    seed = json.load(open(single / "results.json"))["seed"]
    wd = tmp_path / "stacked"
    pair(wd, cache, tmp_path, kill_at_checkpoint=False, extra=(f"--config.seeds={seed},7",
                                                               "--config.federation.stack_seeds=True"))
    assert "2 seeds as one program" in (tmp_path / "process0.log").read_text()
    for x, y in zip(users(single), users(wd / f"comigs_s{seed}")):
        assert y["test_ppl"] == pytest.approx(x["test_ppl"], **APPROX)
    assert [h["users"] for h in json.load(open(wd / "hosts.json"))] == [list(range(12))] * 2
