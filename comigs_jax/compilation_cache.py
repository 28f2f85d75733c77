"""JAX's persistent compilation cache, on by default for runs, studies and benches.

    from comigs_jax import compilation_cache
    compilation_cache.configure(cfg)   # before the process's first compile

The compiled XLA programs are stored in `<data.cache_dir>/xla` (the default data.cache_dir is
~/.cache/comigs_jax/data), so a second process that compiles the same programs (a rerun, a resume,
the next cell of a study, the next bench) loads them instead (docs/benchmarks.md has the seconds
it saves). `output.compilation_cache=False` (a bench: `compilation_cache=False`) turns it off. An
existing setting of the environment wins: JAX_COMPILATION_CACHE_DIR (the test suite's own cache)
and JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS are left as they are. JAX decides whether a process
uses the cache at its first compile, so this must run before it (the commands call it right after
parsing their config; experiment.run calls it too, a no-op when already configured)."""
from __future__ import annotations

import os

DEFAULT_ROOT = "~/.cache/comigs_jax/data"  # data.cache_dir's default (comigs_jax/data/config.py)
# Programs that compile faster than this are not stored (JAX's default is 1 s, which leaves out
# most of this project's CPU programs; every stored program is one file of a few hundred KB).
MIN_COMPILE_SECS = 0.0


def enabled_in(cfg) -> bool:
    """The config's switch: output.compilation_cache (experiment and study configs) or a top-level
    compilation_cache (the bench); on when the config has neither."""
    output = cfg.get("output")
    if output is not None and "compilation_cache" in output:
        return bool(output.compilation_cache)
    return bool(cfg.get("compilation_cache", True))


def cache_dir_of(cfg) -> str:
    """<data.cache_dir>/xla, expanded (the default data.cache_dir when the config has no data group)."""
    data = cfg.get("data")
    root = data.get("cache_dir", DEFAULT_ROOT) if data is not None else DEFAULT_ROOT
    return os.path.join(os.path.expanduser(str(root)), "xla")


def configure(cfg) -> str | None:
    """Turn JAX's persistent compilation cache on (in `cache_dir_of(cfg)` unless the environment
    names one) or off, as `cfg` says; returns the directory in use (None: off)."""
    import jax
    if not enabled_in(cfg):
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR") and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache_dir_of(cfg))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
    return jax.config.jax_compilation_cache_dir
