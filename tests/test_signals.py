"""A second SIGTERM means now, even inside one long device call (issue 14 item 7).

The process boundary is the point: a real `python -m experiments.run`, a `full` evaluation of
large test splits (one device call of many seconds), two SIGTERMs 2 s apart while it runs."""
import os
import signal
import subprocess
import sys
import threading
import time

import procenv
from comigs_jax.experiment.signals import StopOnSignal

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A 1-layer, 512-wide base (the FLOPs per token of 4 layers x 256, a quarter of the layers to
# compile) and 100k test tokens per user: the first evaluation takes ~15 s on an idle 2-core machine
# (many times that under load), so the signals land inside it.
LONG_EVAL = ["--config=configs/tiny.py", "--config.train.rounds=2", "--config.eval.every_rounds=1",
             "--config.data.test_tokens=100000", "--config.pretrain.n_layer=1", "--config.pretrain.n_embd=512",
             "--config.pretrain.n_head=4", "--config.pretrain.steps=2", "--config.output.figures=False"]


class _Output:
    """Every line the process prints (stdout and stderr merged), read by a thread."""

    def __init__(self, proc):
        self.lines, self._lock = [], threading.Lock()
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc):
        for line in proc.stdout:
            with self._lock:
                self.lines.append(line)

    def text(self, start=0) -> str:
        with self._lock:
            return "".join(self.lines[start:])

    def __len__(self):
        with self._lock:
            return len(self.lines)


def _wait_for(cond, timeout, proc, out, what, every=0.2):
    t0 = time.time()
    while not cond():
        assert proc.poll() is None, f"exited ({proc.returncode}) before {what}:\n{out.text()[-3000:]}"
        assert time.time() - t0 < timeout, f"no {what} within {timeout} s:\n{out.text()[-3000:]}"
        time.sleep(every)


def test_second_sigterm_during_a_long_evaluation_exits_within_5_s(tmp_path):
    wd = tmp_path / "wd"
    env = procenv.env()  # one CPU device, as a user's machine
    proc = subprocess.Popen([sys.executable, "-m", "experiments.run", *LONG_EVAL, f"--workdir={wd}",
                             f"--config.data.cache_dir={tmp_path / 'cache'}"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = _Output(proc)
    try:
        _wait_for(lambda: "rounds 1..2" in out.text(), 600, proc, out, "round loop")

        def in_evaluation():  # kill -USR1: faulthandler prints the Python stack, even inside a device call
            n = len(out)
            proc.send_signal(signal.SIGUSR1)
            time.sleep(0.5)
            dump = out.text(n)
            return "in evaluate" in dump and "simulation.py" in dump

        # Few stack dumps: faulthandler's all-thread dump can crash a process whose threads change
        # meanwhile (once, under load 11, the run died with SIGSEGV before its evaluation).
        _wait_for(in_evaluation, 600, proc, out, "evaluation", every=2.0)
        proc.send_signal(signal.SIGTERM)  # the first: finish the round, checkpoint, stop ...
        time.sleep(2.0)
        assert proc.poll() is None, out.text()[-3000:]  # ... which cannot happen inside the device call
        assert in_evaluation(), "the evaluation ended before the second signal: make it longer"
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)  # the second: now
        rc = proc.wait(timeout=30)
        waited = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.text()
    assert rc == 128 + signal.SIGTERM, text[-3000:]
    assert waited < 5.0, waited
    last = text.strip().splitlines()[-1]
    assert last.startswith("stopped at once by a second SIGTERM (no checkpoint was written)"), text[-3000:]
    assert "resumes from it" in last
    ckpts = wd / "checkpoints"
    assert not ckpts.exists() or not [n for n in os.listdir(ckpts) if n.isdigit()]  # round 1 never finished


def test_watcher_counts_signals_and_restores_the_handlers():
    """In-process: one signal sets the flag (the round finishes); the handlers and wakeup fd come back."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with StopOnSignal() as stop:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # the handler runs between bytecodes
        assert stop.signum == signal.SIGTERM and stop.requested()
    assert {s: signal.getsignal(s) for s in before} == before
    assert signal.set_wakeup_fd(-1) == -1  # no wakeup fd left behind
