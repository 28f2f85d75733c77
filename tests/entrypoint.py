"""The real `python -m experiments.run`: in a subprocess, as a user's one-CPU machine runs it
(`run`, `start`: where the process boundary is the point: kills, signals, the CLI's own stderr),
or its `main(argv)` in this process (`main`: same flags, same exit code and one-line error,
without a new interpreter and a cold compile per call)."""
import contextlib
import io
import os
import subprocess
import sys

import procenv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env():
    return procenv.env()  # one CPU device, not the tests' 8 fake ones


def cmd(args, cache):
    return [sys.executable, "-m", "experiments.run", *args, f"--config.data.cache_dir={cache}"]


def run(args, cache, timeout=300):
    return subprocess.run(cmd(args, cache), cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)


def start(args, cache):
    return subprocess.Popen(cmd(args, cache), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def main(args, cache=None):
    """experiments.run.main in this process, as `run` would call it; a CompletedProcess (returncode,
    stdout, stderr). The test process has 8 fake devices and a subprocess one, so unless the
    args say otherwise the users are not sharded (--config.federation.shard=False, a key that may
    change between a run and its resumption): the run is then the one-device run of a
    subprocess, bit for bit (results.json and checkpoints), and resumes a subprocess's run."""
    from experiments import run as entry
    argv = ["experiments.run", *args]
    if cache is not None:
        argv.append(f"--config.data.cache_dir={cache}")
    if not any(a.startswith(("--config.federation.shard", "--noconfig.federation.shard")) for a in args):
        argv.append("--config.federation.shard=False")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(REPO), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = entry.main(argv)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
