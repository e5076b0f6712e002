"""Host memory: let glibc's malloc keep freed tensors' memory for the next step instead of unmapping it.

glibc serves an allocation at or over its mmap threshold (128 KiB at start, rising with the sizes freed, to
32 MiB at most) with a fresh `mmap`, and unmaps it on free. A training step on CPU frees and reallocates
the same large tensors every step, so each one's pages are faulted in (and zeroed by the kernel) again
every step: one fault per 4 KiB, ~2 us each on this project's Xeon VM. Tensors of 32 MiB and more can never
come from the heap under the default settings. The MoE's routed rows are such tensors (T*K x D fp32: 32 MiB
at byte_s's 4,096 tokens x top-8 x 256, 48 MiB at 6 x 384); a dense model of the same active size has none.
Measured at byte_s, one quiet thread: 83-86k page faults a step in kimi_mha's forward + backward; with the
heap kept its training step went from 1,222-1,229 to 1,096-1,119 ms (0.69x -> 0.79x dense_muon's tokens/s),
dense_muon's unchanged (docs/benchmarking.md, "Page faults").

The cost: RSS no longer shrinks after a peak (freed memory stays mapped for reuse), so `kimi.bench memory`,
which measures peaks with a fixed threshold of its own, sets glibc's variables and is left alone here.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
_GLIBC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def malloc_set_by_environment() -> bool:
    """The user (or a bench) configured glibc's malloc through its environment variables."""
    return any(k in os.environ for k in _GLIBC_ENV) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")


@functools.cache
def keep_freed_memory() -> bool:
    """Serve every allocation from malloc's heap (M_MMAP_MAX = 0) and never trim it (M_TRIM_THRESHOLD = -1),
    for this whole process from now on (once: later calls return the first answer). Returns whether it
    applied: False off glibc (macOS, musl) and when the environment sets glibc's malloc itself."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or malloc_set_by_environment():
        return False
    libc = ctypes.CDLL(None)  # the process's own symbols, glibc's mallopt among them
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))
