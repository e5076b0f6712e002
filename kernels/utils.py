"""Launch helpers shared by the kernels: interpreter detection and block sizing."""

from __future__ import annotations

import os

import triton

# Triton decides at @triton.jit time whether a kernel is compiled or interpreted, so the answer is the one
# in force when this package was imported (the kernels are defined right after), not today's environment.
try:
    _INTERPRET = bool(triton.knobs.runtime.interpret)
except AttributeError:  # Triton < 3.4 has no knobs; it read the same variable
    _INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """True when the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 before kimi.kernels was imported)."""
    return _INTERPRET


def row_block(rows: int, width: int) -> int:
    """Rows per program for a (rows, width) tile. On a GPU, ~4k elements keeps the tile in registers; the
    interpreter pays per program instance (a 1-row block ran a 4096x64 softmax 270x slower than 256 rows),
    so there it takes up to 64k elements at once."""
    budget = 65536 if interpreting() else 4096
    return max(1, min(triton.next_power_of_2(max(rows, 1)), budget // width))
