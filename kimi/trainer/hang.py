"""A collective that timed out: another rank is hung (stopped, stuck in a kernel or a filesystem call, on a
host that froze) and will not join. The launcher cannot see it (the process is alive), so without a bound
the whole job waits forever; with `parallel.timeout_s` gloo raises in the ranks still running, and the
trainer turns that into `CollectiveTimeout`: one line, exit code `HANG_EXIT_CODE`, and a restart resumes
from the last checkpoint.

What the line can name: the rank that reports and the step it was in. Not the hung rank: gloo's error
("Timed out waiting 15000ms for recv operation to complete") names no peer, and a rank two hops away in a
ring times out on a healthy neighbour that is itself waiting. On NCCL the watchdog aborts the process on a
timeout (TORCH_NCCL_ASYNC_ERROR_HANDLING) before Python sees an error; the launcher then stops the job.
"""

from __future__ import annotations

import re

HANG_EXIT_CODE = 5  # not 3 (requeue: SLURM would requeue onto the same hung node) and not 4 (NaN)

_TIMEOUT = re.compile(r"timed? ?out|timeout", re.IGNORECASE)


class CollectiveTimeout(RuntimeError):
    """A collective waited `parallel.timeout_s` for a rank that never came: one line that says where."""


def as_collective_timeout(
    e: BaseException, rank: int, step: int, timeout_s: float, where: str
) -> CollectiveTimeout | None:
    """The one-line error for `e` if it is a collective's timeout (gloo raises a RuntimeError, or a
    DistBackendError, its subclass, saying "Timed out ..."), else None. `where` says which checkpoint a
    restart resumes from."""
    if not isinstance(e, RuntimeError) or not _TIMEOUT.search(str(e)):
        return None
    detail = re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip().splitlines()[0])  # gloo's "[/path/file.cc:78] " prefix
    return CollectiveTimeout(
        f"rank {rank}: a collective timed out after {timeout_s:g} s at step {step} (parallel.timeout_s; {detail}): "
        f"another rank is hung or dead; the job stops so a restart can resume from {where}"
    )
