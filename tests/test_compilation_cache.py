"""JAX's persistent compilation cache (comigs_jax/compilation_cache.py): on by default in
<data.cache_dir>/xla, off with output.compilation_cache=False, an environment setting respected.
Whether a process uses the cache is decided at its first compile, so each case is a new process
(a few lines of Python: configure, then one jitted function)."""
import json
import os
import subprocess
import sys

import ml_collections
import pytest

import procenv
from comigs_jax import compilation_cache as cc

PROBE = """
import json, sys
import jax, jax.numpy as jnp, ml_collections
from comigs_jax import compilation_cache
hits = []
jax.monitoring.register_event_listener(lambda e, **k: hits.append(e) if e == "/jax/compilation_cache/cache_hits" else None)
cfg = ml_collections.ConfigDict(json.loads(sys.argv[1]))
d = compilation_cache.configure(cfg)
jax.jit(lambda x: jnp.tanh(x) @ x.T + 1.0)(jnp.ones((8, 8))).block_until_ready()
print(json.dumps({"dir": d, "hits": len(hits)}))
"""


def _probe(cfg: dict, env_dir=None) -> dict:
    env = procenv.env()
    for k in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        env.pop(k, None)
    if env_dir is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = str(env_dir)
    p = subprocess.run([sys.executable, "-c", PROBE, json.dumps(cfg)], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def _files(d) -> list:
    return [f for _, _, fs in os.walk(d) for f in fs] if os.path.isdir(d) else []


def test_on_by_default_under_the_cache_dir_and_reused(tmp_path):
    cfg = {"data": {"cache_dir": str(tmp_path / "cache")}, "output": {"compilation_cache": True}}
    first = _probe(cfg)
    assert first == {"dir": str(tmp_path / "cache" / "xla"), "hits": 0}
    assert _files(first["dir"]), "nothing stored"
    assert _probe(cfg)["hits"] >= 1  # a second process loads the program instead of compiling it


def test_off_and_environment_respected(tmp_path):
    off = {"data": {"cache_dir": str(tmp_path / "off")}, "output": {"compilation_cache": False}}
    assert _probe(off) == {"dir": None, "hits": 0} and not _files(tmp_path / "off")
    env_dir = tmp_path / "env"
    on = {"data": {"cache_dir": str(tmp_path / "on")}, "output": {"compilation_cache": True}}
    assert _probe(on, env_dir)["dir"] == str(env_dir)
    assert _files(env_dir) and not _files(tmp_path / "on" / "xla")


def test_switch_and_directory_of_each_kind_of_config():
    C = ml_collections.ConfigDict
    assert cc.enabled_in(C({"output": {"compilation_cache": False}})) is False
    assert cc.enabled_in(C({"compilation_cache": False})) is False  # the bench's key
    assert cc.enabled_in(C({"output": {}})) is True
    assert cc.cache_dir_of(C({"data": {"cache_dir": "~/x"}})) == os.path.join(os.path.expanduser("~/x"), "xla")
    assert cc.cache_dir_of(C({})) == os.path.join(os.path.expanduser(cc.DEFAULT_ROOT), "xla")


@pytest.mark.parametrize("path", ["configs/base.py", "configs/bench.py"])
def test_configs_turn_it_on(path):
    from comigs_jax import cli
    assert cc.enabled_in(cli.load_config_file(os.path.join(cli.ROOT, path))) is True
