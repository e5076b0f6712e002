"""Helpers shared by the bench commands: markdown tables (pasted into docs/benchmarking.md), JSON, peak RSS."""

from __future__ import annotations

import json
from pathlib import Path


def md_table(head: list[str], rows: list[list[str]]) -> list[str]:
    """Lines of a GitHub markdown table."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def save_json(path: str | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=1))


def vm_hwm(pid: int | str = "self") -> int | None:
    """Peak RSS (VmHWM) of a live process in bytes, from /proc (Linux); None when unreadable.

    Not ru_maxrss: Linux carries the spawning process's peak RSS over into the child's ru_maxrss at
    exec, so a child started by a big parent would report the parent's peak."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
