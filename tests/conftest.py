import os

from procenv import xla_flags

# 8 fake CPU devices for the sharding tests, and the suite's compile flags (tests/procenv.py); must
# be set before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()

# One persistent XLA compilation cache for the whole session, inherited by the subprocesses the
# tests start: they compile the same tiny programs again and again (compile time dominates).
_OWN_CACHE = None  # the cache folder this process made (the xdist controller's), removed at the end
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile
    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="comigs-jax-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:
        import shutil
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)

# Tests never reach a model or dataset hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ASSETS = os.path.join(os.path.dirname(__file__), "assets")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """One data cache (token caches and the pretrained base of configs/tiny.py) for every run of
    the tiny config in the session, in-process or subprocess: the base is pretrained once."""
    return str(tmp_path_factory.mktemp("tiny_cache"))


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory, tiny_cache):
    """One uninterrupted `experiments.run --config=configs/tiny.py` (in-process, one device: bit for
    bit a subprocess's run): (workdir, CompletedProcess). Tests that change it work on a copy."""
    from entrypoint import main
    wd = str(tmp_path_factory.mktemp("tiny_reference") / "tiny")
    p = main(["--config=configs/tiny.py", f"--workdir={wd}"], tiny_cache)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return wd, p
