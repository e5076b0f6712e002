"""The on-disk token format, shared by the writer (`pipeline.py`) and the reader (`dataset.py`).

    OUT/train/shard_00000.bin   256-byte header + token ids (little-endian uint16, or uint32 for big vocabularies)
    OUT/train/manifest.json     each shard's file name, token count and sha256; tokenizer, vocab, corpus, sources
    OUT/val/...

Header: magic b"NKSHARD\\0", u32 version, u32 dtype code (1 = uint16, 2 = uint32), u64 token count,
zero padding to 256 bytes. A fixed header keeps the token data aligned, so `np.memmap` can map it at an
offset without copying.

Every file is written to a temp name in the same directory and renamed into place, so a crash never leaves a
half-written file under the final name; the manifest is written last and names only complete shards.

Readers check every shard's sha256 against the manifest once (`verify_split`): the verdict is cached per
file version, keyed by (name, size, mtime_ns, expected sha256), in OUT/<split>/.verified.json, or, where
the data directory is read-only, under the nanoKimi cache dir. Any rewrite of a shard changes its mtime
and is hashed again; only an edit that also restores the old mtime would slip past the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import struct
from pathlib import Path
from typing import Any

import numpy as np

from kimi.files import cache_dir, sha256_file

MAGIC = b"NKSHARD\0"
VERSION = 1
HEADER_BYTES = 256
_HEADER = struct.Struct("<8sIIQ")
DTYPES = {1: np.dtype("<u2"), 2: np.dtype("<u4")}
MANIFEST = "manifest.json"
RERUN = "re-run python -m kimi.prepare"


class ShardError(ValueError):
    """A shard or manifest is missing, truncated or corrupt; the message names the file."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab <= 65536), uint32 otherwise: half the disk and page cache."""
    return DTYPES[1] if vocab_size <= 1 << 16 else DTYPES[2]


def _dtype_code(dtype: np.dtype) -> int:
    for code, dt in DTYPES.items():
        if np.dtype(dtype) == dt:
            return code
    raise ValueError(f"shards hold uint16 or uint32 tokens, not {dtype}")


def _new_tmp(path: Path) -> tuple[int, str]:
    """A new temp file beside `path` (`.NAME.XXXX.tmp`), open for writing, with the mode any new file gets
    (0666 less the umask, as open() applies it): tempfile.mkstemp's 0600 would survive the rename and leave
    a shared dataset unreadable to the other users of the machine."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), str(tmp)
        except FileExistsError:
            continue


def atomic_write_bytes(path: Path, parts: list[bytes | memoryview]) -> None:
    """Write `parts` to `path` through a temp file + fsync + rename."""
    path = Path(path)
    fd, tmp = _new_tmp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ShardWriter:
    """One shard written as tokens come: they go straight to a temp file, so no shard is ever held in
    memory. `close()` writes the header, fsyncs, hashes the file and renames it into place."""

    def __init__(self, path: str | Path, dtype: np.dtype):
        self.path, self.dtype, self.num_tokens = Path(path), np.dtype(dtype).newbyteorder("<"), 0
        _dtype_code(self.dtype)
        fd, self.tmp = _new_tmp(self.path)
        self.file = os.fdopen(fd, "wb")
        self.file.write(bytes(HEADER_BYTES))

    def write(self, tokens: np.ndarray) -> None:
        self.file.write(memoryview(np.ascontiguousarray(tokens, dtype=self.dtype)).cast("B"))
        self.num_tokens += tokens.size

    def close(self) -> str:
        """Finish the shard under its final name; returns its sha256 (header included)."""
        try:
            header = _HEADER.pack(MAGIC, VERSION, _dtype_code(self.dtype), self.num_tokens)
            self.file.seek(0)
            self.file.write(header.ljust(HEADER_BYTES, b"\0"))
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            sha = sha256_file(self.tmp)
            os.replace(self.tmp, self.path)
            return sha
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        self.file.close()
        Path(self.tmp).unlink(missing_ok=True)


def write_shard(path: str | Path, tokens: np.ndarray) -> str:
    """Write one shard atomically; returns the file's sha256 (header included)."""
    writer = ShardWriter(path, tokens.dtype)
    writer.write(tokens)
    return writer.close()


def read_header(path: str | Path) -> tuple[np.dtype, int]:
    """(dtype, token count) of a shard; refuses bad magic, unknown version/dtype and truncated files."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"shard '{path}' is missing; {RERUN}")
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES or head[:8] != MAGIC:
        raise ShardError(f"'{path}' is not a nanoKimi token shard (bad magic); {RERUN}")
    _, version, code, n = _HEADER.unpack_from(head)
    if version != VERSION or code not in DTYPES:
        raise ShardError(
            f"shard '{path}' has version {version} / dtype code {code}, which this code cannot read; {RERUN}"
        )
    expected = HEADER_BYTES + n * DTYPES[code].itemsize
    size = path.stat().st_size
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise ShardError(f"shard '{path}' is {what} ({size} bytes, expected {expected}); {RERUN}")
    return DTYPES[code], n


def open_shard(path: str | Path, num_tokens: int | None = None, sha256: str | None = None) -> np.memmap:
    """Map a shard read-only after checking its header and size (and, if given, its count and hash)."""
    dtype, n = read_header(path)
    if num_tokens is not None and n != num_tokens:
        raise ShardError(f"shard '{path}' holds {n} tokens but the manifest says {num_tokens}; {RERUN}")
    if sha256 is not None and sha256_file(path) != sha256:
        raise ShardError(f"shard '{path}' is corrupt (sha256 differs from the manifest); {RERUN}")
    if n == 0:
        return np.zeros(0, dtype=dtype)  # np.memmap refuses empty maps
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(n,))


def write_manifest(split_dir: str | Path, manifest: dict[str, Any]) -> None:
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    atomic_write_bytes(Path(split_dir) / MANIFEST, [text.encode()])


def read_manifest(split_dir: str | Path) -> dict[str, Any]:
    path = Path(split_dir) / MANIFEST
    if not path.is_file():
        raise ShardError(f"'{path}' is missing (an interrupted prepare?); {RERUN}")
    try:
        manifest = json.loads(path.read_text())
        assert isinstance(manifest, dict) and isinstance(manifest["shards"], list)
    except (ValueError, AssertionError, KeyError):
        raise ShardError(f"'{path}' is not a valid manifest; {RERUN}") from None
    return manifest


def open_split(split_dir: str | Path, verify: bool = False) -> tuple[dict[str, Any], list[np.memmap]]:
    """The manifest and one memmap per shard. Sizes and headers are always checked; `verify=True`
    also recomputes every sha256 (reads all the data: seconds per GB; `verify_split` caches it)."""
    split_dir = Path(split_dir)
    manifest = read_manifest(split_dir)
    maps = []
    for entry in manifest["shards"]:
        sha = entry["sha256"] if verify else None
        maps.append(open_shard(split_dir / entry["file"], entry["num_tokens"], sha))
    return manifest, maps


VERIFIED = ".verified.json"


def _verdict_files(split_dir: Path) -> list[Path]:
    """Where verdicts are cached, in order of preference: next to the shards, else the user's cache dir."""
    key = hashlib.sha256(str(split_dir.resolve()).encode()).hexdigest()[:16]
    return [split_dir / VERIFIED, cache_dir() / "verified" / f"{key}.json"]


def _read_verdicts(split_dir: Path) -> dict[str, list]:
    for path in _verdict_files(split_dir):
        try:
            verdicts = json.loads(path.read_text())
            if isinstance(verdicts, dict):
                return verdicts
        except (OSError, ValueError):
            continue
    return {}


def _write_verdicts(split_dir: Path, verdicts: dict[str, list]) -> None:
    """Best effort: a directory nobody can write to means hashing again next time, never an error."""
    text = json.dumps(verdicts, indent=1, sort_keys=True) + "\n"
    for path in _verdict_files(split_dir):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, [text.encode()])
            return
        except OSError:
            continue


def verify_split(split_dir: str | Path, manifest: dict[str, Any]) -> None:
    """Check each shard's sha256 against the manifest, hashing each version of a file only once (the
    verdict is cached by name, size, mtime_ns and expected hash; see the module docstring)."""
    split_dir = Path(split_dir)
    verdicts = _read_verdicts(split_dir)
    fresh = False
    for entry in manifest["shards"]:
        path = split_dir / entry["file"]
        st = path.stat()
        key = [st.st_size, st.st_mtime_ns, entry["sha256"]]
        if verdicts.get(entry["file"]) == key:
            continue
        if sha256_file(path) != entry["sha256"]:
            raise ShardError(f"shard '{path}' is corrupt (sha256 differs from the manifest); {RERUN}")
        verdicts[entry["file"]], fresh = key, True
    if fresh:
        _write_verdicts(split_dir, verdicts)
