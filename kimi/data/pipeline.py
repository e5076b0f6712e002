"""Text -> token shards: tokenise in worker processes, write memory-mappable shards and a manifest. The
library behind `python -m kimi.prepare` (the CLI, kimi/prepare.py).

    prepare(corpus, "data/shakespeare", data_cfg)  ->  {"train": SplitInfo, "val": SplitInfo}
    TextDataProcessor(DataConfig()).process_dataset("mine", train_files=[...])  ->  (train_dir, val_dir)
    TextDataProcessor(DataConfig()).process_dataset("mine", train_texts=ds)  # strings, dicts, datasets.Dataset

Every document is preceded by <|endoftext|> (50256), which thus both separates documents and marks where
one begins (llm.c's convention). Output depends only on the inputs and settings, never on the number of
workers: tasks (~1 MB of text) are tokenised in parallel but written in order.

Memory does not grow with the corpus: documents stream from the readers, at most IN_FLIGHT tasks per
worker are queued, tokens go straight into the shard file being written (`ShardWriter`), and the default
hold-out streams too (kimi/data/holdout.py). An interrupted prepare leaves no manifest, so the split never
reads as complete; a re-run of the same inputs goes on after its last finished shard (`_Progress`) and
ends with the same bytes as an uninterrupted run.

Idempotent: each split's manifest records a fingerprint of everything the tokens depend on (corpus and its
source hashes, split rule version, tokenizer, shard size). A re-run whose fingerprint matches and whose
shards all pass a full sha256 check touches nothing; otherwise the split is rewritten, manifest last.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import multiprocessing
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kimi.config import DataConfig
from kimi.data.corpora import Corpus, CorpusError, files_corpus, get_corpus, texts_corpus
from kimi.data.shards import (
    MANIFEST,
    VERSION,
    ShardError,
    ShardWriter,
    atomic_write_bytes,
    dtype_for_vocab,
    open_shard,
    open_split,
    read_manifest,
    write_manifest,
)
from kimi.data.tokenizer import chunkable, get_tokenizer
from kimi.data.tokenizer_files import tokenizer_files

SPLITS = ("train", "val")
CHUNK_CHARS = 1 << 20  # long documents are cut into ~1 MB pieces so one big file still uses every worker
TASK_CHARS = 1 << 20  # text per worker task: short documents are grouped up to this
IN_FLIGHT = 4  # tasks queued per worker: keeps each busy; text in flight <= IN_FLIGHT x workers x ~1 MB
PROGRESS = ".progress.json"


@dataclass
class SplitInfo:
    path: Path
    num_tokens: int
    num_shards: int
    skipped: bool  # True when an up-to-date split was left untouched


def chunk_text(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """Cut `text` into pieces of about `size` chars whose separate encodings concatenate to the encoding
    of the whole. We cut only between a non-space character and a newline: no GPT-2 pre-token spans
    that point (letters/digits/symbol runs never contain whitespace, whitespace runs contain nothing else),
    and the regex sees the same text on both sides of it."""
    pieces, start = [], 0
    while len(text) - start > size:
        cut = text.find("\n", start + size)
        while cut != -1 and text[cut - 1].isspace():
            cut = text.find("\n", cut + 1)
        if cut == -1:
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def tasks(docs: Iterable[str], tokenizer: str) -> Iterator[list[tuple[bool, str]]]:
    """Documents grouped into tasks of about TASK_CHARS, long ones cut into pieces (see `chunk_text`).
    Each entry is (first piece of a document, text); a function of the documents only."""
    cut = chunk_text if chunkable(get_tokenizer(tokenizer)) else lambda doc: [doc]
    task, chars = [], 0
    for doc in docs:
        for i, piece in enumerate(cut(doc)):
            task.append((i == 0, piece))
            chars += len(piece)
            if chars >= TASK_CHARS:
                yield task
                task, chars = [], 0
    if task:
        yield task


def _encode(job: tuple[str, list[tuple[bool, str]]]) -> np.ndarray:
    """A task's tokens: each document's pieces encoded separately, <|endoftext|> before each document."""
    name, pieces = job
    enc = get_tokenizer(name)
    ids: list[int] = []
    for first, text in pieces:
        if first:
            ids.append(enc.eot_token)
        ids.extend(enc.encode_ordinary(text))
    return np.fromiter(ids, dtype=dtype_for_vocab(enc.n_vocab), count=len(ids))


class Workers:
    """The tokenising processes of one prepare: started on first use and shared by its splits (a start
    costs each worker an interpreter and a tokenizer). Leaving the `with` block on an error terminates them."""

    def __init__(self, num_workers: int):
        self.num_workers, self._pool = num_workers, None

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if self._pool is not None and exc_type is None:
            self._pool.close()
            self._pool.join()
        elif self._pool is not None:
            self._pool.terminate()

    def tokenize(self, docs: Iterable[str], tokenizer: str, skip: int = 0) -> Iterator[tuple[np.ndarray, list]]:
        """(tokens, task) for each task after the first `skip`, in order. At most IN_FLIGHT tasks per
        worker are queued, so memory does not grow with the corpus; one worker means this process."""
        jobs = itertools.islice(tasks(docs, tokenizer), skip, None)
        if self.num_workers <= 1:
            yield from ((_encode((tokenizer, task)), task) for task in jobs)
            return
        if self._pool is None:
            # "spawn", not fork: forking a process that runs other threads (torch's, MLflow's, pytest's) can
            # hand a worker a lock that no thread will ever release (seen here: a Pool worker stuck forever).
            self._pool = multiprocessing.get_context("spawn").Pool(self.num_workers)
        pending: collections.deque = collections.deque()
        for task in jobs:
            pending.append((self._pool.apply_async(_encode, ((tokenizer, task),)), task))
            if len(pending) >= IN_FLIGHT * self.num_workers:
                result, done = pending.popleft()
                yield result.get(), done
        while pending:
            result, done = pending.popleft()
            yield result.get(), done


def fingerprint(corpus: Corpus, split: str, tokenizer: str, shard_tokens: int) -> str:
    spec = {"format": VERSION, "corpus": corpus.name, "corpus_version": corpus.version, "sources": corpus.sources,
            "split": split, "tokenizer": tokenizer, "shard_tokens": shard_tokens}  # fmt: skip
    if corpus.settings:  # only when set, so that the fingerprints of earlier datasets stay as they were
        spec["settings"] = corpus.settings
    if files := tokenizer_files(tokenizer):  # an edited tokenizer file re-prepares
        spec["tokenizer_files"] = files
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _up_to_date(split_dir: Path, fp: str) -> dict | None:
    try:
        manifest = read_manifest(split_dir)
        if manifest.get("fingerprint") != fp:
            return None
        open_split(split_dir, verify=True)
        return manifest
    except ShardError:
        return None


class _Progress:
    """Where an interrupted write_split stands: the shards it finished, and the first token not in them
    (task number and offset into that task's tokens). Saved after every shard as OUT/<split>/.progress.json;
    a re-run with the same fingerprint whose shards all check out goes on from there."""

    def __init__(self, split_dir: Path, fp: str):
        self.path, self.fp = split_dir / PROGRESS, fp
        self.shards: list[dict] = []
        self.task = self.offset = self.num_documents = 0

    def resume(self) -> bool:
        try:
            state = json.loads(self.path.read_text())
            if state["fingerprint"] != self.fp or state["task_chars"] != TASK_CHARS:
                return False
            for entry in state["shards"]:
                open_shard(self.path.parent / entry["file"], entry["num_tokens"], entry["sha256"])
        except (OSError, ValueError, KeyError, TypeError):
            return False
        self.shards, self.task, self.offset = state["shards"], state["task"], state["offset"]
        self.num_documents = state["num_documents"]
        return True

    def save(self) -> None:
        state = {"fingerprint": self.fp, "task_chars": TASK_CHARS, "shards": self.shards, "task": self.task,
                 "offset": self.offset, "num_documents": self.num_documents}  # fmt: skip
        atomic_write_bytes(self.path, [json.dumps(state, indent=1).encode()])


def write_split(
    docs: Iterable[str],
    split_dir: Path,
    corpus: Corpus,
    split: str,
    cfg: DataConfig,
    fp: str,
    workers: Workers,
    progress: bool = True,
) -> dict:
    """Tokenise `docs` into `split_dir`/shard_NNNNN.bin + manifest.json (replacing what was there), or go
    on from where an interrupted run of the same inputs stopped (`_Progress`)."""
    split_dir.mkdir(parents=True, exist_ok=True)
    (split_dir / MANIFEST).unlink(missing_ok=True)  # from here on the split reads as incomplete
    for stale in split_dir.glob(".*.tmp"):
        stale.unlink()
    state = _Progress(split_dir, fp)
    if state.resume():
        kept = sum(s["num_tokens"] for s in state.shards)
        tqdm.write(f"{corpus.name}/{split}: resuming an interrupted prepare after {len(state.shards)} shard(s), "
                   f"{kept:,} tokens")  # fmt: skip
    enc = get_tokenizer(cfg.tokenizer_name)
    dtype = dtype_for_vocab(enc.n_vocab)
    bar = tqdm(unit="char", unit_scale=True, desc=f"{corpus.name}/{split}", disable=not progress, leave=False)
    writer, resumed_task = None, state.task
    for t, (ids, task) in enumerate(workers.tokenize(docs, cfg.tokenizer_name, state.task), state.task):
        bar.update(sum(len(text) for _, text in task))
        pos = state.offset if t == resumed_task else 0
        if pos == 0:
            state.num_documents += sum(first for first, _ in task)
        while pos < ids.size:
            if writer is None:
                writer = ShardWriter(split_dir / f"shard_{len(state.shards):05d}.bin", dtype)
            take = min(ids.size - pos, cfg.shard_tokens - writer.num_tokens)
            writer.write(ids[pos : pos + take])
            pos += take
            if writer.num_tokens == cfg.shard_tokens:
                state.shards.append(_finish(writer))
                state.task, state.offset = (t, pos) if pos < ids.size else (t + 1, 0)
                state.save()
                writer = None
    bar.close()
    if writer is not None:
        state.shards.append(_finish(writer))
    keep = {s["file"] for s in state.shards}
    for old in split_dir.glob("shard_*.bin"):
        if old.name not in keep:
            old.unlink()
    manifest = {
        "format": "nanokimi-shards", "version": VERSION, "corpus": corpus.name, "corpus_version": corpus.version,
        "split": split, "tokenizer": cfg.tokenizer_name, "vocab_size": enc.n_vocab, "eot_token": enc.eot_token,
        "dtype": dtype.name, "num_tokens": sum(s["num_tokens"] for s in state.shards),
        "num_documents": state.num_documents, "shard_tokens": cfg.shard_tokens, "shards": state.shards,
        "sources": corpus.sources, "fingerprint": fp,
    }  # fmt: skip
    if corpus.settings:
        manifest["settings"] = corpus.settings
    if files := tokenizer_files(cfg.tokenizer_name):
        manifest["tokenizer_files"] = files
    write_manifest(split_dir, manifest)
    state.path.unlink(missing_ok=True)
    return manifest


def _finish(writer: ShardWriter) -> dict:
    return {"file": writer.path.name, "num_tokens": writer.num_tokens, "sha256": writer.close()}


def prepare(
    corpus: Corpus, out_dir: str | Path, cfg: DataConfig | None = None, force: bool = False, progress: bool = True
) -> dict[str, SplitInfo]:
    """Write OUT/train and OUT/val for `corpus`; up-to-date splits are verified and left as they are."""
    cfg = cfg or DataConfig()
    if cfg.shard_tokens < 1 or cfg.num_workers < 0:
        raise ValueError(f"data.shard_tokens={cfg.shard_tokens} must be >= 1 and data.num_workers >= 0")
    get_tokenizer(cfg.tokenizer_name)  # fail on a bad name before any work (and warm forked workers' cache)
    out: dict[str, SplitInfo] = {}
    written: list[Path] = []
    try:
        with Workers(cfg.num_workers) as workers:
            for split in SPLITS:
                out[split] = _prepare_split(
                    corpus, Path(out_dir) / split, split, cfg, force, workers, written, progress
                )
    except BaseException:
        # a failure in val (a bad --val-files input) must not leave this run's train looking complete
        for split_dir in written:
            (split_dir / "manifest.json").unlink(missing_ok=True)
        raise
    return out


def _prepare_split(corpus: Corpus, split_dir: Path, split: str, cfg: DataConfig, force: bool, workers: Workers,
                   written: list[Path], progress: bool) -> SplitInfo:  # fmt: skip
    fp = fingerprint(corpus, split, cfg.tokenizer_name, cfg.shard_tokens)
    # without sources (texts from an iterable) nothing says the inputs are unchanged: always rewrite
    manifest = None if force or not corpus.sources else _up_to_date(split_dir, fp)
    skipped = manifest is not None
    if manifest is None:
        docs = corpus.train() if split == "train" else corpus.val()
        written.append(split_dir)
        manifest = write_split(docs, split_dir, corpus, split, cfg, fp, workers, progress)
    if manifest["num_tokens"] == 0:  # training would fail on it later, far from the cause: say it here
        (split_dir / MANIFEST).unlink(missing_ok=True)
        raise CorpusError(_empty_split_message(corpus.name, split))
    return SplitInfo(split_dir, manifest["num_tokens"], len(manifest["shards"]), skipped)


def _empty_split_message(name: str, split: str) -> str:
    if split == "train":
        return (f"'{name}': the inputs hold no text (0 tokens; empty files and blank 'text' fields are skipped); "
                "check the --files paths")  # fmt: skip
    return (f"'{name}': the val split holds no text (0 tokens); pass --val-files, or more text (without "
            "--val-files the last 5% of the text is held out for validation)")  # fmt: skip


def prepare_corpus(name: str, out_dir: str | Path, cfg: DataConfig | None = None, **kw) -> dict[str, SplitInfo]:
    """A named corpus (see kimi.data.corpora.CORPORA), downloaded into the cache on first use."""
    cfg = cfg or DataConfig()
    return prepare(get_corpus(name, cfg.cache_dir), out_dir, cfg, **kw)


def prepare_files(
    train_files: list,
    val_files: list | None,
    out_dir: str | Path,
    cfg: DataConfig | None = None,
    name: str = "custom",
    text_field: str = "text",
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    strict: bool = False,
    **kw,
) -> dict[str, SplitInfo]:
    """The user's files or folders, of any kind kimi/data/sources.py reads."""
    corpus = files_corpus(name, train_files, val_files, text_field, include, exclude, strict)
    return prepare(corpus, out_dir, cfg, **kw)


class TextDataProcessor:
    """The README's entry point: `process_dataset(name, train_files, val_files) -> (train_dir, val_dir)`.

    With files, `name` only labels the data; without, it must be a named corpus (else CorpusError).
    `train_texts` / `val_texts` take any iterable of strings, or of dicts with `text_field` (so a
    `datasets.Dataset`), instead of files; such data is rewritten on every call (nothing to hash).
    Output goes to `out_dir`, default `data/<name>`, ready for `--data.dataset=data/<name>`."""

    def __init__(self, config: DataConfig | None = None, progress: bool = True):
        self.config = config or DataConfig()
        self.progress = progress

    def process_dataset(
        self,
        name: str,
        train_files: list | None = None,
        val_files: list | None = None,
        out_dir: str | Path | None = None,
        force: bool = False,
        *,
        train_texts: Iterable | None = None,
        val_texts: Iterable | None = None,
        text_field: str = "text",
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        strict: bool = False,
    ) -> tuple[str, str]:
        out_dir = Path(out_dir) if out_dir is not None else Path("data") / name
        kw = {"force": force, "progress": self.progress}
        if train_texts is not None:
            info = prepare(texts_corpus(name, train_texts, val_texts, text_field), out_dir, self.config, **kw)
        elif train_files:
            info = prepare_files(train_files, val_files, out_dir, self.config, name, text_field, include, exclude,
                                 strict, **kw)  # fmt: skip
        else:
            info = prepare_corpus(name, out_dir, self.config, **kw)
        return str(info["train"].path), str(info["val"].path)
