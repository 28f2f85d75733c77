"""The environment of the processes the tests start, and the XLA flags every test process uses.

The suite is bound by XLA's CPU compiles of small programs, not by running them: the tests compile
with LLVM's optimisation off (about 30 % less time per compile). In-process runs (conftest sets
the flags) and subprocesses (`env`) use the same flags, so the tests that compare a subprocess's
run with an in-process one bit for bit still compare like with like.
"""
import os

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def xla_flags(devices=None) -> str:
    """The test processes' XLA flags, with `devices` fake CPU devices (None: XLA's default, one)."""
    flags = FAST_COMPILE
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
