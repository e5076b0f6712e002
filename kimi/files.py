"""Small file helpers more than one layer needs: a file's sha256 and the nanoKimi cache dir. A leaf: it
imports nothing from kimi, so data and checkpoint can both use it without importing each other (it ended
the kimi.data.corpora <-> kimi.data.shards import cycle).
"""

from __future__ import annotations

import hashlib
import os
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

