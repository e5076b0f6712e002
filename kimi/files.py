"""Small file helpers more than one layer needs: a file's sha256, the nanoKimi cache dir, and the git state
of the source tree. A leaf: it imports nothing from kimi, so data, checkpoint, tracking and bench can all
use it without importing each other (it ended the kimi.data.corpora <-> kimi.data.shards import cycle,
and spares checkpoint.py matplotlib, which importing kimi.tracking pulls in).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes, read in `chunk`-byte blocks (bounded memory on large shards)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Downloads live in `override`, else $NANOKIMI_CACHE, else $XDG_CACHE_HOME/nanokimi (~/.cache/nanokimi)."""
    if override:
        return Path(override).expanduser()
    if os.environ.get("NANOKIMI_CACHE"):
        return Path(os.environ["NANOKIMI_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nanokimi"


def git_state(where: Path) -> tuple[str | None, bool]:
    """(HEAD commit, has uncommitted changes) of the repo holding `where`, or (None, False) outside git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout
        return head or None, bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        return None, False
