"""Output helpers shared by the bench commands: markdown tables (pasted into docs/benchmarking.md) and JSON."""

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
