"""SIGINT / SIGTERM during the rounds: the first finishes the round, checkpoints and stops; the
second exits now, wherever the run is.

Python runs a signal handler only between bytecodes of the main thread, so a handler cannot
interrupt one long device call (a `full` evaluation of large test splits is one). The C-level
handler does write the signal number to the wakeup fd at once, though: a watcher thread reads it
and, on the second signal, ends the process with os._exit (orbax writes checkpoints to a
temporary folder renamed when complete, so the last complete checkpoint stays as it is).
"""
from __future__ import annotations

import os
import signal
import socket
import threading

import numpy as np

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal:
    """While active, SIGINT/SIGTERM set `signum` instead of killing the process (the loop checks
    `requested()` after each round); a second one exits at once with 128 + signum. Outside the
    block, signals have their default effect. Off the main thread (where Python cannot install
    handlers) it does nothing."""

    def __init__(self, message=None):
        self.signum: int | None = None
        # what the immediate exit prints (a callable, read when the second signal arrives)
        self.message = message or (lambda signum: f"stopped at once by a second {signal.Signals(signum).name}")
        self._old: dict = {}
        self._old_fd = None
        self._sockets = None
        self._count = 0

    def __enter__(self) -> "StopOnSignal":
        self.signum, self._count = None, 0
        if threading.current_thread() is not threading.main_thread():
            return self
        r, w = socket.socketpair()
        r.setblocking(True)
        w.setblocking(False)
        self._sockets = (r, w)
        self._old_fd = signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
        self._old = {s: signal.signal(s, self._handle) for s in SIGNALS}
        threading.Thread(target=self._watch, args=(r,), name="comigs-second-signal", daemon=True).start()
        return self

    def __exit__(self, *exc) -> bool:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}
        if self._sockets is not None:
            signal.set_wakeup_fd(self._old_fd if self._old_fd is not None else -1)
            r, w = self._sockets
            self._sockets = None
            w.close()  # the watcher's recv returns b"" and it ends
        return False

    def _handle(self, signum, frame):  # the main thread, between bytecodes
        if self.signum is None:
            self.signum = signum  # no printing here: a handler may interrupt a print (reentrant I/O)

    def _watch(self, r: socket.socket) -> None:
        """The wakeup fd gets one byte per signal as it arrives, even while the main thread waits
        in a device call; the second SIGINT/SIGTERM ends the process here."""
        try:
            while True:
                data = r.recv(64)
                if not data:
                    return
                for signum in data:
                    if signum not in SIGNALS:
                        continue
                    self._count += 1
                    if self._count >= 2:
                        try:
                            os.write(2, (self.message(signum) + "\n").encode())
                        finally:
                            os._exit(128 + signum)
        finally:
            r.close()

    def requested(self) -> bool:
        """Whether any process was asked to stop (all processes agree, so all save and stop)."""
        import jax
        flag = self.signum is not None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            flag = bool(np.asarray(multihost_utils.process_allgather(np.array([flag]))).any())
        return flag
