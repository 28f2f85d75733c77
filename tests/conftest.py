import os

from procenv import xla_flags

# 8 fake CPU devices for the sharding tests, and the suite's compile flags (tests/procenv.py); must
# be set before jax is imported anywhere.
os.environ["XLA_FLAGS"] = xla_flags(8)  # keeps the flags the suite was started with (procenv.USER_FLAGS)

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


# pytest-xdist hands out whole files (--dist loadfile), by default those with the most tests first:
# the few-test files that run whole experiments in subprocesses (minutes each) came last and left
# one worker running them alone. setup.cfg turns that order off (--no-loadscope-reorder) and the
# files run in this order instead, the longest first (their durations on 2 cores); the rest after
# them, in pytest's order. A file missing here only runs later; its tests are the same.
LONGEST_FIRST = ("test_reliability.py", "test_engine.py", "test_chunks.py", "test_moe.py",
                 "test_multihost_run.py", "test_llama_engine.py", "test_bench.py", "test_head_loss.py",
                 "test_remat.py", "test_capacity_llama.py", "test_multihost.py", "test_capacity.py",
                 "test_gguf.py", "test_llama.py", "test_reproduce.py", "test_signals.py", "test_readme.py", "test_api.py",
                 "test_data_synthetic.py", "test_bench_multihost.py", "test_bench_llama.py", "test_hf_io.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a file stays


@pytest.fixture
def x64():
    """64-bit JAX for one test: the tests that compare two programs of the same math run their
    models in float64 there (tests/tiny.py TOL64), so their verdict does not depend on the CPU."""
    import jax
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="module")
def x64_module():
    """64-bit JAX for a whole test module whose tests all compare programs in float64."""
    import jax
    with jax.enable_x64(True):
        yield


def _shared_dir(tmp_path_factory, name):
    """A folder for the whole session: under pytest-xdist, the same one for every worker (the
    parent of the workers' own base folders), else this process's own."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        d = tmp_path_factory.getbasetemp().parent / name
        d.mkdir(exist_ok=True)
        return d
    return tmp_path_factory.mktemp(name)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """One data cache (token caches and the pretrained base of configs/tiny.py) for every run of
    the tiny config in the session, in-process or subprocess, on every xdist worker: the base is
    pretrained once (the cache writes by atomic renames, so two workers may fill it at once)."""
    return str(_shared_dir(tmp_path_factory, "tiny_cache"))


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory, tiny_cache):
    """One uninterrupted `experiments.run --config=configs/tiny.py` (in-process, one device: bit for
    bit a subprocess's run): (workdir, CompletedProcess). Run once for the whole session: the first
    xdist worker to need it runs it (the others wait on the lock) and the others read its result.
    Tests that change it work on a copy."""
    import fcntl
    import json
    import shutil
    import subprocess

    from entrypoint import main
    root = _shared_dir(tmp_path_factory, "tiny_reference")
    wd, done = str(root / "tiny"), root / "process.json"
    with open(str(root) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if done.exists():
            return wd, subprocess.CompletedProcess(**json.loads(done.read_text()))
        shutil.rmtree(wd, ignore_errors=True)  # what a failed attempt of another worker left
        p = main(["--config=configs/tiny.py", f"--workdir={wd}"], tiny_cache)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        done.write_text(json.dumps({"args": p.args, "returncode": p.returncode, "stdout": p.stdout,
                                    "stderr": p.stderr}))
    return wd, p


# COMIGS_COMPILE_REPORT=FILE: one JSON line per test with its in-process XLA compile count and
# seconds, tracing and lowering seconds and compilation-cache hits (subprocesses not counted). The
# suite is bound by compiles, and their count does not depend on the machine's load as wall time does.
_COMPILE_REPORT = os.environ.get("COMIGS_COMPILE_REPORT")
if _COMPILE_REPORT:
    import collections
    import json as _json
    import time as _time

    import jax.monitoring as _monitoring

    _events = collections.Counter()

    def _on_duration(event, duration, **kwargs):
        if event.startswith(("/jax/core/compile", "/jax/compilation_cache")):
            _events[event + ":s"] += duration
            _events[event + ":n"] += 1

    def _on_event(event, **kwargs):
        if event.startswith("/jax/compilation_cache"):
            _events[event + ":n"] += 1

    _monitoring.register_event_duration_secs_listener(_on_duration)
    _monitoring.register_event_listener(_on_event)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        before, t0 = collections.Counter(_events), _time.perf_counter()
        yield
        delta = {k.replace("/jax/", ""): round(v - before[k], 3) for k, v in _events.items() if v != before[k]}
        with open(_COMPILE_REPORT, "a") as f:
            f.write(_json.dumps({"test": item.nodeid, "wall_s": round(_time.perf_counter() - t0, 2), **delta}) + "\n")


def write_safetensors(path, tensors, dtype_name, dtype):
    """A safetensors file written by hand (safetensors.numpy has no bfloat16)."""
    import json

    import numpy as np
    header, blobs, offset = {}, [], 0
    for name, arr in tensors.items():
        b = np.ascontiguousarray(arr.astype(dtype)).tobytes()
        header[name] = {"dtype": dtype_name, "shape": list(arr.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h + b"".join(blobs))
