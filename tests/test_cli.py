"""Every failure of the CLI is one line (issue 14 item 8), checked in-process through
experiments.run.main(argv), which parses on a fresh FlagValues and returns the exit code."""
import errno
import os

import pytest

from comigs_jax import cli
from experiments import run as run_cli

TINY = "--config=configs/tiny.py"


def _fails_with_one_line(capsys, argv) -> str:
    code = run_cli.main(["experiments.run", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("arg,key,home,near", [
    ("--config.train.lrr=0.1", "train.lrr", "configs/base.py", "train.lr"),
    ("--config.data.seeed=3", "data.seeed", "comigs_jax/data/config.py", "data.seed"),
    ("--config.data.synthetic.vocab=3", "data.synthetic.vocab", "comigs_jax/data/config.py",
     "data.synthetic.vocab_size"),
    ("--config.nonexistent=1", "nonexistent", "configs/base.py", None),
])
def test_unknown_key_names_the_key_and_the_file_of_its_group(arg, key, home, near, capsys, tmp_path):
    line = _fails_with_one_line(capsys, [TINY, arg, f"--workdir={tmp_path / 'wd'}"])
    assert line.startswith(f"error: {arg.split('=')[0]}: unknown config key '{key}'")
    assert f"defined in {home}" in line
    assert (f"did you mean '{near}'?" in line) if near else "did you mean" not in line
    assert not (tmp_path / "wd").exists()


def test_workdir_under_a_regular_file(capsys, tmp_path):
    (tmp_path / "afile").write_text("x")
    line = _fails_with_one_line(capsys, [TINY, f"--workdir={tmp_path / 'afile' / 'wd'}"])
    assert "a part of the path is a regular file, not a directory" in line and "use another --workdir" in line
    line = _fails_with_one_line(capsys, [TINY, f"--workdir={tmp_path / 'afile'}"])
    assert "it exists and is not a directory" in line


@pytest.mark.parametrize("err,why", [(errno.EACCES, "permission denied"), (errno.ENOSPC, "no space left"),
                                     (errno.EROFS, "read-only file system")])
def test_workdir_that_cannot_be_created(err, why, capsys, tmp_path, monkeypatch):
    """Root ignores permissions here, so the OS's refusal is simulated where the workdir is made."""
    real = os.makedirs

    def refuse(path, *a, **k):
        if str(path).startswith(str(tmp_path)):
            raise OSError(err, os.strerror(err), str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(os, "makedirs", refuse)
    line = _fails_with_one_line(capsys, [TINY, f"--workdir={tmp_path / 'wd'}"])
    assert why in line and str(tmp_path / "wd") in line


def test_a_full_disk_during_the_run_is_one_line(capsys):
    def body():
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/metrics.jsonl")
    assert cli.main_guard(body) == 1
    assert capsys.readouterr().err.strip().splitlines() == ["error: No space left on device: /runs/x/metrics.jsonl"]


def test_other_errors_are_not_swallowed():
    """A bug (an OSError the user cannot fix, or any other exception) keeps its traceback."""
    def body():
        raise OSError(errno.EBADF, "Bad file descriptor")
    with pytest.raises(OSError):
        cli.main_guard(body)
    with pytest.raises(ZeroDivisionError):
        cli.main_guard(lambda: 1 / 0)


def test_missing_config_file_and_bad_value(capsys, tmp_path):
    line = _fails_with_one_line(capsys, ["--config=configs/missing.py"])
    assert "config file 'configs/missing.py' not found" in line
    line = _fails_with_one_line(capsys, [TINY, "--config.train.rounds=2.5", f"--workdir={tmp_path / 'wd'}"])
    assert "--config.train.rounds=2.5" in line


def test_default_workdir_and_resume_command():
    argv = ["experiments/run.py", "--config=configs/agnews.py:fedavg", "--config.resume=False", "--config.seed=3"]
    assert run_cli.default_workdir(argv) == os.path.join("runs", "agnews_fedavg")
    assert run_cli.default_workdir(["run"]) == os.path.join("runs", "demo")
    assert cli.resume_command("experiments.run", argv) == \
        "python -m experiments.run --config=configs/agnews.py:fedavg --config.seed=3"


def test_help_lists_the_flags_and_where_the_defaults_live(capsys):
    assert run_cli.main(["experiments.run", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Train and evaluate CoMiGS") and "--workdir" in out
    assert "--config=FILE[:ARG]: the config file (default configs/demo.py)" in out
    assert "data.*: comigs_jax/data/config.py" in out and "other keys: configs/base.py" in out
