"""Training processes a bench started, stopped with it.

`kimi.bench compare` trains each run as its own `python -m kimi.train`. Killing compare with SIGTERM
(`kill PID`, a scheduler's preemption) used to leave those children training on, unseen. Inside
`Children.on_sigterm()`, SIGTERM instead passes SIGTERM on to every live child (the trainer saves a
checkpoint and exits, so `compare --resume` continues the run), starts no new one, waits for them, and
exits with 128 + SIGTERM. Ctrl-C reaches the children by itself (the terminal signals the whole group).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading


class Stopped(Exception):
    """Raised in a worker that would start or score a run after SIGTERM arrived."""


class Children:
    def __init__(self, grace_s: float = 120.0) -> None:
        self.live: set[subprocess.Popen] = set()
        self.stopping = False
        self.grace_s = grace_s  # how long a child may take to save before it is killed
        self._lock = threading.Lock()

    def popen(self, cmd: list[str], **kwargs) -> subprocess.Popen:
        with self._lock:
            if self.stopping:
                raise Stopped("stopping: no new run is started")
            p = subprocess.Popen(cmd, **kwargs)
            self.live.add(p)
            return p

    def done(self, p: subprocess.Popen) -> None:
        with self._lock:
            self.live.discard(p)
        if self.stopping:
            raise Stopped("stopped by SIGTERM")

    def _stop(self, signum, frame) -> None:
        with self._lock:
            self.stopping = True
            live = list(self.live)
        for p in live:
            p.send_signal(signal.SIGTERM)
        for p in live:
            try:
                p.wait(timeout=self.grace_s)
            except subprocess.TimeoutExpired:
                p.kill()
        raise SystemExit(128 + signum)

    @contextlib.contextmanager
    def on_sigterm(self):
        """SIGTERM stops the children while inside (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGTERM, self._stop)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)
