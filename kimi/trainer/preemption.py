"""Preemption: SIGTERM / SIGUSR1 finish the current step, write a checkpoint and exit with
REQUEUE_EXIT_CODE, so a scheduler (SLURM --requeue, torchrun restarts) can start the job again and it
resumes from that checkpoint."""

from __future__ import annotations

import signal

REQUEUE_EXIT_CODE = 3


class Preemption:
    """SIGTERM / SIGUSR1 set a flag; the trainer reads it once per step, before the update (agreed across
    ranks), and saves and exits after that step. `stop_after=k` behaves as if a signal arrived during
    step k (tests stop a run exactly where they want with it)."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.signum: int | None = None
        self.stop_after = stop_after
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGUSR1)}

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def requested(self, step: int) -> bool:
        return self.signum is not None or step == self.stop_after

    def restore(self) -> None:
        """Give the signals back (a process that goes on after train() must stay killable)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
