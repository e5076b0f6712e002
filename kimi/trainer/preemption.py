"""Preemption: SIGTERM / SIGUSR1 finish the current step, write a checkpoint and exit with
REQUEUE_EXIT_CODE, so a scheduler (SLURM --requeue, torchrun restarts) can start the job again and it
resumes from that checkpoint."""

from __future__ import annotations

import os
import signal
from pathlib import Path

REQUEUE_EXIT_CODE = 3
# The launchers (launch/torchrun.sh run_torchrun, slurm/common.sh) name a file here: torchrun turns any
# worker's exit code into 1, so a process that exits REQUEUE_EXIT_CODE also writes this file, and the
# launcher returns REQUEUE_EXIT_CODE when it exists after torchrun has ended.
REQUEUE_FILE_ENV = "KIMI_REQUEUE_FILE"
# The opposite verdict, for slurm/common.sh, which requeues a crash: a process that stops on an error a
# restart would only repeat (bad input, exit 2; NaN/inf, exit 4) names it in this file, and the job fails.
FATAL_FILE_ENV = "KIMI_FATAL_FILE"


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


def clear_requeue_mark() -> None:
    """At start: a mark left by an earlier round (torchrun --max-restarts restarts workers that exited 3)
    must not make a later failure look like a save, or like an error a restart would repeat."""
    for env in (REQUEUE_FILE_ENV, FATAL_FILE_ENV):
        if path := os.environ.get(env):
            Path(path).unlink(missing_ok=True)


def mark_requeue(step: int | None) -> None:
    """Leave the launcher's marker (if it named one): "checkpoint at `step` written, requeue me"."""
    _mark(REQUEUE_FILE_ENV, f"step {step}")


def mark_fatal(code: int, error: BaseException) -> None:
    """Leave slurm/common.sh's marker (if it named one): "exit `code`: a restart would fail the same way"."""
    text = str(error).strip()
    _mark(FATAL_FILE_ENV, f"exit {code}: {text.splitlines()[0][:200] if text else type(error).__name__}")


def _mark(env: str, line: str) -> None:
    """Every process that exits this way writes the same line, each through its own temporary file and an
    atomic rename, so a reader never sees a partial one."""
    path = os.environ.get(env)
    if not path:
        return
    target = Path(path)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{line}\n")
    os.replace(tmp, target)
