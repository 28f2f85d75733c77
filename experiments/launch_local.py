"""Start N JAX processes on this machine, as the hosts of a pod would run them.

    python -m experiments.launch_local --processes 2 --devices-per-process 4 -- \
        --config=configs/demo.py --workdir=runs/demo2p

Each process runs `python -m experiments.run <arguments>` (or `--module`) with
JAX_COORDINATOR_ADDRESS (a free port on 127.0.0.1), JAX_NUM_PROCESSES and JAX_PROCESS_ID set,
and, on CPU, `--devices-per-process` fake devices; experiments.run then calls
jax.distributed.initialize() and the processes form one mesh. Process 0's output is streamed;
the others' is kept and shown only if one fails. If any process fails, or the timeout passes,
all are stopped and the exit code is non-zero. On a real pod, run the same experiments.run
command on every host instead (JAX detects the cluster, or pass --config.distributed.*).
"""
from __future__ import annotations

import argparse
import collections
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(stream, sink, tail: collections.deque) -> None:
    for line in iter(stream.readline, ""):
        tail.append(line)
        if sink is not None:
            sink.write(line)
            sink.flush()
    stream.close()


def launch(args: list[str], processes: int, devices_per_process: int, module: str = "experiments.run",
           timeout: float | None = None, env: dict | None = None) -> int:
    """Run `processes` copies of `python -m module args`; returns the first non-zero exit code (or 0)."""
    port = free_port()
    procs, tails, threads = [], [], []
    base_env = dict(os.environ if env is None else env)
    for i in range(processes):
        e = dict(base_env, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
                 JAX_PROCESS_ID=str(i))
        if devices_per_process:
            flags = [f for f in e.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
            e["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
            e.setdefault("JAX_PLATFORMS", "cpu")
        p = subprocess.Popen([sys.executable, "-m", module, *args], env=e, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
        tail = collections.deque(maxlen=40)
        t = threading.Thread(target=_pump, args=(p.stdout, sys.stdout if i == 0 else None, tail), daemon=True)
        t.start()
        procs.append(p), tails.append(tail), threads.append(t)

    def stop_all():
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.time() + 10
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)

    start = time.time()
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i = failed[0]
                stop_all()
                for t in threads:
                    t.join(timeout=2)
                sys.stderr.write(f"launch_local: process {i} exited with code {codes[i]}; its last lines:\n")
                sys.stderr.write("".join(tails[i]))
                return codes[i]
            if all(c == 0 for c in codes):
                for t in threads:
                    t.join(timeout=2)
                return 0
            if timeout is not None and time.time() - start > timeout:
                stop_all()
                sys.stderr.write(f"launch_local: timeout after {timeout:.0f} s; all {processes} processes stopped\n")
                return 124
            time.sleep(0.2)
    except KeyboardInterrupt:
        stop_all()
        return 130


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" in argv:
        split = argv.index("--")
        own, rest = argv[:split], argv[split + 1:]
    else:
        own, rest = argv, []
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--processes", type=int, default=2, help="number of JAX processes")
    ap.add_argument("--devices-per-process", type=int, default=4,
                    help="fake CPU devices per process (0: leave the platform's devices alone)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds before every process is stopped")
    ap.add_argument("--module", default="experiments.run", help="python module each process runs")
    a = ap.parse_args(own)
    if a.processes < 1:
        ap.error(f"--processes={a.processes}: at least 1")
    return launch(rest, a.processes, a.devices_per_process, a.module, a.timeout)


if __name__ == "__main__":
    sys.exit(main())
