"""The environment of the processes the tests start, and the XLA flags every test process uses.

The suite is bound by XLA's CPU compiles of small programs, not by running them: the tests compile
with LLVM's optimisation off (about 30 % less time per compile) and with XLA's older loop emitters
instead of its fusion emitters (`--xla_cpu_use_fusion_emitters=false`: half the compile time again;
the whole suite 5:02 against 8:17 on 2 quiet cores, 2026-12-03). Those emitters sum in an order
that depends on the shapes, so two programs of the same math (chunked and all at once) can differ
in the last bit, which Adam amplifies for near-zero gradients: tests that compare trained models of
different programs run them in float64 (tests/tiny.py TOL64, the `x64` fixture). In-process runs
(conftest sets the flags) and subprocesses (`env`) use the same flags, so the tests that compare a
subprocess's run with an in-process one bit for bit still compare like with like.
"""
import os

FAST_COMPILE = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false")
# The XLA flags the suite was started with (e.g. XLA_FLAGS=--xla_cpu_max_isa=AVX2 pytest tests, to
# check the suite on another instruction set), read before conftest adds its own: every test
# process, the subprocesses too, keeps them. A device count there is the suite's to set.
USER_FLAGS = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                      if not f.startswith("--xla_force_host_platform_device_count") and f not in FAST_COMPILE.split())


def xla_flags(devices=None) -> str:
    """The test processes' XLA flags, with `devices` fake CPU devices (None: XLA's default, one)."""
    flags = f"{USER_FLAGS} {FAST_COMPILE}".strip()
    if devices is not None:
        flags += f" --xla_force_host_platform_device_count={devices}"
    return flags


def env(devices=None, **extra) -> dict:
    """This process's environment for a CPU subprocess with `devices` fake devices, no inherited
    multi-process coordinates."""
    e = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices), **extra)
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        e.pop(k, None)
    return e
