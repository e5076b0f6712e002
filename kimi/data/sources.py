"""Reading the user's text: one small reader per input kind behind `iter_texts(path, text_field)`.

    kind                          read as                                       one document per
    .txt .md                      UTF-8 text                                    file
    .jsonl                        one JSON object per line                      line (its text field)
    .json                         JSON lines, pretty-printed objects, or one    object
                                  array of objects
    .parquet                      pyarrow, batch by batch within row groups     row (its text column)
    .arrow                        Arrow IPC stream or file, batch by batch      row
    X.gz X.zst                    X, decompressed as a stream
    a folder with state.json      a `datasets` save_to_disk folder: its         row
                                  _data_files (.arrow or .parquet), in order

Everything streams: lines, JSON values, record batches; no reader holds a whole file, except a text file,
which is one document by definition. `expand_sources` turns the inputs (files and folders, walked
recursively in sorted order) into the list of sources and says in one line which files it skipped.
Every failure is a CorpusError naming the file and the fix.
"""

from __future__ import annotations

import fnmatch
import gzip
import io
import json
import shutil
import sys
import tempfile
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


class CorpusError(ValueError):
    """A corpus cannot be fetched or read; the message says what to do."""


TEXT_KINDS = (".txt", ".md")
KINDS = (*TEXT_KINDS, ".jsonl", ".json", ".parquet", ".arrow")
CODECS = (".gz", ".zst")
READ_CHARS = 1 << 20  # what the incremental JSON reader reads at a time


@dataclass(frozen=True)
class Source:
    """One input: a file, or a save_to_disk folder (`files` are its data files, in the dataset's order)."""

    path: Path
    files: tuple[Path, ...]


def kind_of(path: Path) -> tuple[str, str]:
    """(kind, codec) from the suffixes: `a.jsonl.zst` -> (".jsonl", ".zst"); unknown kinds give ""."""
    suffixes = [s.lower() for s in path.suffixes]
    codec = suffixes.pop() if suffixes and suffixes[-1] in CODECS else ""
    kind = suffixes[-1] if suffixes and suffixes[-1] in KINDS else ""
    return kind, codec


def is_saved_dataset(folder: Path) -> bool:
    return (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()


def _saved_dataset(folder: Path) -> Source:
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        files = tuple(folder / f["filename"] for f in state["_data_files"])
    except (ValueError, KeyError, TypeError) as e:
        raise CorpusError(
            f"'{folder / 'state.json'}' does not list the data files (_data_files: {e}); save the dataset again "
            "with save_to_disk"
        ) from None
    for f in files:
        if not f.is_file():
            raise CorpusError(f"'{f}', listed in {folder / 'state.json'}, is missing; save the dataset again")
    return Source(folder, files)


def _matches(rel: str, globs: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(rel, g) or fnmatch.fnmatchcase(rel.rsplit("/", 1)[-1], g) for g in globs)


def _walk(folder: Path, include: Sequence[str], exclude: Sequence[str]) -> tuple[list[Source], list[Path]]:
    """(sources, files of no known kind) below `folder`: sorted, recursive, hidden names left out; a
    save_to_disk folder inside counts as one source."""
    found, unknown = [], []
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder)
        if any(s.startswith(".") for s in rel.parts) or not f.is_file():
            continue
        if f.name == "state.json" and is_saved_dataset(f.parent):
            if not (
                include and not _matches(rel.parent.as_posix(), include) or _matches(rel.parent.as_posix(), exclude)
            ):
                found.append(_saved_dataset(f.parent))
        elif any(is_saved_dataset(a) for a in [f.parent, *f.parent.parents][: len(rel.parts) - 1]):
            continue  # inside a saved dataset below `folder`: read through its state.json
        elif include and not _matches(rel.as_posix(), include) or _matches(rel.as_posix(), exclude):
            continue
        elif kind_of(f)[0]:
            found.append(Source(f, (f,)))
        else:
            unknown.append(f)
    return found, unknown


def expand_sources(
    paths: Iterable, include: Sequence[str] = (), exclude: Sequence[str] = (), strict: bool = False
) -> list[Source]:
    """The sources behind `paths`. A file given by name is read even if its kind is unknown (as text); in a
    folder, --include/--exclude globs (matched against the path below the folder or the file name) choose
    the files, and files of no known kind are skipped with one summary line, or refused with `strict`."""
    out, skipped = [], []
    for p in map(Path, paths):
        if p.is_dir() and is_saved_dataset(p):
            out.append(_saved_dataset(p))
        elif p.is_dir():
            if (p / "dataset_dict.json").is_file():
                raise CorpusError(f"'{p}' is a saved DatasetDict; pass one of its splits, e.g. '{p / 'train'}'")
            found, unknown = _walk(p, include, exclude)
            if unknown and strict:
                raise CorpusError(
                    f"'{unknown[0]}' is of no known kind ({' '.join(KINDS)}, optionally .gz/.zst); "
                    "remove it, --exclude it, or drop --strict to skip such files"
                )
            if not found:
                why = f" of a known kind ({' '.join(KINDS)}, optionally .gz/.zst)" if unknown else ""
                raise CorpusError(f"folder '{p}' holds no files{why}; check the path and --include/--exclude")
            out.extend(found)
            skipped.extend(unknown)
        elif p.is_file():
            out.append(Source(p, (p,)))
        elif p.exists():  # /dev/null, a pipe, a socket: nothing to hash or to read twice
            raise CorpusError(f"input '{p}' is not a regular file or folder; give text files or folders of them")
        else:
            raise CorpusError(f"input '{p}' does not exist")
    if skipped:
        print(_skip_line(skipped), file=sys.stderr)
    return out


def _skip_line(skipped: list[Path]) -> str:
    kinds = Counter("".join(f.suffixes[-1:]) or "(no suffix)" for f in skipped)
    shown = ", ".join(f"{k} x{n}" if n > 1 else k for k, n in kinds.most_common())
    names = ", ".join(str(f) for f in skipped[:3]) + (", ..." if len(skipped) > 3 else "")
    plural = "s" if len(skipped) > 1 else ""
    return f"skipped {len(skipped)} file{plural} of no known kind ({shown}): {names}; --strict refuses them"


# ----------------------------------------------------------------------------- readers


def iter_texts(source: Source | str | Path, text_field: str = "text") -> Iterator[str]:
    """The documents of one source, in order; blank ones are left out."""
    source = source if isinstance(source, Source) else Source(Path(source), (Path(source),))
    for path in source.files:
        kind, codec = kind_of(path)
        try:
            yield from _READERS.get(kind, _text)(path, codec, text_field)
        except UnicodeDecodeError:
            raise CorpusError(f"'{path}' is not UTF-8 text; convert it (e.g. iconv -t utf-8)") from None
        except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
            raise CorpusError(f"cannot read '{path}' ({e.strerror}); check the path and its permissions") from None
        except (OSError, EOFError, zlib.error) as e:
            raise _codec_error(path, codec, e) from None
        except CorpusError:
            raise
        except Exception as e:
            if type(e).__module__.startswith(("pyarrow", "zstandard")):
                raise _codec_error(path, codec, e) from None
            raise


def _codec_error(path: Path, codec: str, e: Exception) -> CorpusError:
    what = {".gz": "gzip", ".zst": "zstd"}.get(codec) or kind_of(path)[0].lstrip(".") or "text"
    why = " ".join(str(e).split())  # pyarrow's messages span lines; ours is one
    return CorpusError(f"'{path}' is not a valid {what} file ({type(e).__name__}: {why}); re-create or re-download it")


def _open_text(path: Path, codec: str) -> io.TextIOBase:
    """Universal newlines, as Path.read_text, so output matches the reader this replaced."""
    if codec == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if codec == ".zst":
        import zstandard

        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")), encoding="utf-8")
    return open(path, encoding="utf-8")


@contextmanager
def _local(path: Path, codec: str) -> Iterator[Path]:
    """`path`, or for a compressed Parquet/Arrow file a decompressed temporary copy: those formats need
    random access, which a compressed stream lacks. The copy streams to disk, never to memory."""
    if not codec:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="kimi-") as tmp, open(Path(tmp) / path.stem, "wb") as out:
        if codec == ".gz":
            src = gzip.open(path, "rb")
        else:
            import zstandard

            src = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True)
        with src:
            shutil.copyfileobj(src, out, 1 << 20)
        out.close()
        yield Path(out.name)


def _text(path: Path, codec: str, field: str) -> Iterator[str]:
    with _open_text(path, codec) as f:
        raw = f.read()  # a text file is one document
    if raw.strip():
        yield raw.replace("\r\n", "\n")


def _field(row, field: str, path: Path, record: int) -> str:
    if isinstance(row, dict) and isinstance(row.get(field), str):
        return row[field]
    has = f"its keys: {', '.join(map(str, row)) or 'none'}" if isinstance(row, dict) else "it is not an object"
    raise CorpusError(f"'{path}' record {record} has no string \"{field}\" field ({has}); pass --text-field KEY")


def _loads(text: str, path: Path, line: int):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CorpusError(
            f"'{path}' line {line} is not valid JSON ({e.msg}); JSON-lines files need one object per line"
        ) from None


def _jsonl(path: Path, codec: str, field: str) -> Iterator[str]:
    with _open_text(path, codec) as f:
        first = f.read(4096).lstrip()[:1]
    if first == "[":  # one array, as the reader this replaced also accepted
        yield from _json(path, codec, field)
        return
    with _open_text(path, codec) as f:
        record = 0
        for i, line in enumerate(f, 1):
            if line.strip():
                record += 1
                text = _field(_loads(line, path, i), field, path, record)
                if text.strip():
                    yield text


def _json(path: Path, codec: str, field: str) -> Iterator[str]:
    """JSON values one after another (JSON lines, or pretty-printed objects), or one array of them, parsed
    incrementally with raw_decode: a chunk at a time, never the whole file."""
    decoder, buf, pos, eof, record, line = json.JSONDecoder(), "", 0, False, 0, 1
    in_array = None  # unknown until the first non-blank character
    with _open_text(path, codec) as f:
        while True:
            while pos < len(buf) and (buf[pos].isspace() or (in_array and buf[pos] in ",]")):
                pos += 1
            if pos == len(buf) and not eof:
                line += buf.count("\n", 0, pos)
                buf, pos = f.read(READ_CHARS), 0
                eof = not buf
                continue
            if pos == len(buf):
                return
            if in_array is None:
                in_array = buf[pos] == "["
                pos += in_array
                continue
            try:
                row, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                more = "" if eof else f.read(max(READ_CHARS, len(buf)))  # maybe cut mid-value: read on
                if not more:
                    eof = True
                    where = line + buf.count("\n", 0, e.pos)
                    raise CorpusError(
                        f"'{path}' line {where} is not valid JSON ({e.msg}); a .json file holds JSON lines, "
                        "JSON objects one after another, or one array of objects"
                    ) from None
                line += buf.count("\n", 0, pos)
                buf, pos = buf[pos:] + more, 0
                continue
            record += 1
            text = _field(row, field, path, record)
            if text.strip():
                yield text
            pos = end


def _column(path: Path, names: list[str], field: str) -> None:
    if field not in names:
        raise CorpusError(f"'{path}' has no column \"{field}\" (its columns: {', '.join(names)}); pass --text-field")


def _batch_texts(batch, path: Path, field: str) -> Iterator[str]:
    col = batch.column(batch.schema.get_field_index(field))
    if str(col.type) not in ("string", "large_string", "string_view"):
        raise CorpusError(f"'{path}' column \"{field}\" holds {col.type}, not text; pass --text-field")
    for text in col.to_pylist():
        if text is not None and text.strip():
            yield text


def _parquet(path: Path, codec: str, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    with _local(path, codec) as local:
        pf = pq.ParquetFile(local)
        _column(path, pf.schema_arrow.names, field)
        for i in range(pf.num_row_groups):  # one row group at a time, in batches, never the whole file
            for batch in pf.iter_batches(batch_size=1024, row_groups=[i], columns=[field], use_threads=False):
                yield from _batch_texts(batch, path, field)


def _arrow(path: Path, codec: str, field: str) -> Iterator[str]:
    """An Arrow IPC stream (what save_to_disk writes) or IPC file, a record batch at a time."""
    import pyarrow as pa

    with _local(path, codec) as local:
        try:
            reader = pa.ipc.open_stream(pa.memory_map(str(local)))
            batches = iter(reader)
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(pa.memory_map(str(local)))
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        _column(path, reader.schema.names, field)
        for batch in batches:
            yield from _batch_texts(batch, path, field)


_READERS = {".jsonl": _jsonl, ".json": _json, ".parquet": _parquet, ".arrow": _arrow}


def iter_records(items: Iterable, text_field: str = "text", where: str = "<iterable>") -> Iterator[str]:
    """Texts from any iterable of strings, or of dicts holding `text_field` (a `datasets.Dataset` iterates
    so; it is duck-typed, never imported)."""
    for i, item in enumerate(items, 1):
        text = item if isinstance(item, str) else _field(item, text_field, Path(where), i)
        if text.strip():
            yield text
