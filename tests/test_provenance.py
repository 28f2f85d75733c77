"""Provenance: the versions, commit and devices recorded with every result."""
import importlib.metadata as md
import subprocess

import jax

from comigs_jax.experiment import provenance as prov

REPO = prov._REPO


def test_versions_commit_and_devices():
    p = prov.provenance()
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers"):
        assert p["versions"][name] == md.version(name), name
    assert (p["device_count"], p["process_count"], p["backend"]) == (jax.device_count(), 1, "cpu")
    rev = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if rev.returncode == 0:  # a git checkout (CI's clean clone is one)
        assert p["git"].split("+")[0] == rev.stdout.strip()
    assert prov.git_commit("/") is None  # not a checkout: None, not an error
