"""Two `python -m experiments.run` processes on this machine as the two hosts of a pod (2 x 4 fake
CPU devices, gloo on 127.0.0.1), and the one-process reference run in the test process (its 8 fake
devices): shared by tests/test_multihost.py and tests/test_multihost_run.py."""
import json
import os
import signal
import subprocess
import sys

import procenv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env(devices):
    return procenv.env(devices, JAX_ENABLE_X64="1")


# In float64: the pair and the one-process reference are different programs (gloo's all-reduce,
# other shardings), compared to tests/tiny.py TOL64.
RUN_ARGS = ["--config=configs/tiny.py", "--config.data.n_users=12", "--config.train.rounds=2",
            "--config.checkpoint.every_rounds=1", "--config.output.figures=False", "--config.model.dtype=float64"]


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_pair(workdir, cache, log_dir, extra=((), ())):
    """Two experiments.run processes x 4 fake devices, as two hosts of a pod (logs kept apart;
    extra[i]: more arguments for process i)."""
    port, procs = free_port(), []
    for i in range(2):
        e = dict(env(4), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
        log = open(log_dir / f"process{i}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "experiments.run", *RUN_ARGS, f"--workdir={workdir}",
                                       f"--config.data.cache_dir={cache}", *extra[i]], cwd=REPO, env=e,
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def wait(procs, timeout=300):
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)


def logs(log_dir) -> str:
    """Both processes' log tails, and their native stacks where dump_stacks took them."""
    out = ""
    for i in range(2):
        out += f"\n--- process {i} ---\n" + (log_dir / f"process{i}.log").read_text()[-3000:]
        stack = log_dir / f"process{i}.stack"
        if stack.exists():
            out += f"\n--- process {i}, native stacks ---\n" + stack.read_text()[-3000:]
    return out


def pair(wd, cache, log_dir, kill_at_checkpoint: bool, timeout=150, extra=()):
    """One 2-process launch that must, within the timeout, finish (or, with kill_at_checkpoint,
    write its round-1 checkpoint, and then both processes are SIGKILLed). A stall fails with
    both processes' logs and stacks."""
    import time
    procs = start_pair(wd, cache, log_dir, (extra, extra))
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if kill_at_checkpoint and (wd / "checkpoints" / "1").is_dir():  # complete: orbax renames
                return
            codes = [q.poll() for q in procs]
            if any(c not in (None, 0) for c in codes):  # one failed: no need to wait for the other
                raise AssertionError(f"exit codes {codes}:" + logs(log_dir))
            if all(c is not None for c in codes):
                assert not kill_at_checkpoint, "finished before the kill" + logs(log_dir)
                return
            time.sleep(0.05)
        dump_stacks(procs, log_dir)
        raise AssertionError(f"2-process run stalled for {timeout} s:" + logs(log_dir))
    finally:
        for q in procs:
            if q.poll() is None:
                os.killpg(q.pid, 9)
        wait(procs)


def dump_stacks(procs, log_dir):
    """Where each process of a stalled pair waits: Python stacks (faulthandler, SIGUSR1) into its
    log, and native stacks (process<i>.stack) when py-spy is installed."""
    import shutil
    import time
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=os.path.dirname(sys.executable))
    for i, q in enumerate(procs):
        if q.poll() is None:
            if spy:
                out = subprocess.run([spy, "dump", "--native", "--pid", str(q.pid)], capture_output=True,
                                     text=True, timeout=60)
                (log_dir / f"process{i}.stack").write_text(out.stdout + out.stderr)
            os.kill(q.pid, signal.SIGUSR1)
    time.sleep(2)


def run_here(args):
    """experiments.run in this process (one process, the tests' 8 fake devices, 64-bit JAX as the
    pair's): the reference."""
    import jax

    from experiments import run as run_cli
    with jax.enable_x64(True):
        return run_cli.main(["experiments.run", *RUN_ARGS, *args])


def users(wd):
    return json.load(open(wd / "results.json"))["users"]
