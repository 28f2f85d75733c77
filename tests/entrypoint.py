"""The real `python -m experiments.run` in a subprocess, as a user's one-CPU machine runs it."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env():
    e = dict(os.environ, JAX_PLATFORMS="cpu")
    e.pop("XLA_FLAGS", None)  # one CPU device, not the tests' 8 fake ones
    return e


def cmd(args, cache):
    return [sys.executable, "-m", "experiments.run", *args, f"--config.data.cache_dir={cache}"]


def run(args, cache, timeout=300):
    return subprocess.run(cmd(args, cache), cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)


def start(args, cache):
    return subprocess.Popen(cmd(args, cache), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
