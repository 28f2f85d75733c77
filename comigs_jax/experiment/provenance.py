"""What produced a result: package versions, the code's git commit, the devices and processes.

Recorded in results.json (experiment.metrics) and bench.json (experiments.bench), so that a
number can be traced to the versions and hardware that gave it."""
from __future__ import annotations

import datetime
import importlib.metadata as md
import os
import platform
import subprocess

import jax

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "tokenizers", "numpy",
            "ml-collections")
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def versions() -> dict:
    """{distribution: version} of the packages a result depends on (None when not installed)."""
    from comigs_jax import __version__
    out = {"python": platform.python_version(), "comigs_jax": __version__}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(repo: str = _REPO) -> str | None:
    """The checkout's commit (short), with "+dirty" when tracked files differ from it; None outside
    a git checkout (an installed package, even one in a venv inside a checkout) or without git."""
    if not os.path.exists(os.path.join(repo, ".git")):
        return None
    try:
        run = lambda *a: subprocess.run(["git", "-C", repo, *a], capture_output=True, text=True, timeout=10)
        rev = run("rev-parse", "--short", "HEAD")
        if rev.returncode:
            return None
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev.stdout.strip() + ("+dirty" if dirty else "")


def provenance() -> dict:
    """Versions, git commit, date, backend, device kind and counts, process count."""
    dev = jax.devices()[0]
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "versions": versions(), "git": git_commit(), "backend": jax.default_backend(),
            "device_kind": dev.device_kind, "device_count": jax.device_count(),
            "local_device_count": jax.local_device_count(), "process_count": jax.process_count()}
