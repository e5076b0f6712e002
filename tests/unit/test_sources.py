"""Input readers (kimi/data/sources.py): each kind, compressed or not, a `datasets` save_to_disk folder, folder
walks with --include/--exclude, the skip summary and --strict, streaming, and one clear line per bad input.
Fixtures are built here with pyarrow, gzip and zstandard: nothing is fetched."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from kimi.data import sources
from kimi.data.sources import CorpusError, expand_sources, iter_records, iter_texts

DOCS = ["First document.\nTwo lines.", "Second, 日本語 ok", "Third: <|endoftext|> stays text."]


def read(path, text_field="text", **kw):
    return [d for s in expand_sources([path], **kw) for d in iter_texts(s, text_field)]


def write_parquet(path, texts, row_group_size=None, field="text"):
    table = pa.table({field: texts, "id": list(range(len(texts)))})
    pq.write_table(table, path, row_group_size=row_group_size, compression="zstd")
    return path


def write_arrow_stream(path, texts, field="text"):
    table = pa.table({field: texts})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=1):  # several batches, as save_to_disk writes them
            writer.write_batch(batch)
    return path


def save_to_disk_layout(folder, parts):
    """The layout `datasets.Dataset.save_to_disk` writes: Arrow IPC stream files, state.json listing them in
    order, dataset_info.json with the features."""
    folder.mkdir(parents=True)
    names = [f"data-{i:05d}-of-{len(parts):05d}.arrow" for i in range(len(parts))]
    for name, texts in zip(names, parts):
        write_arrow_stream(folder / name, texts)
    state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": "abc", "_split": "train"}
    (folder / "state.json").write_text(json.dumps(state))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "string"}}}))
    return folder


def jsonl(texts, **extra):
    return "".join(json.dumps({"text": t, **extra}, ensure_ascii=False) + "\n" for t in texts)


KINDS = {
    "a.txt": lambda p: p.write_text("one\r\nfile\r\n"),
    "a.md": lambda p: p.write_text("# one\n\nfile\n"),
    "a.jsonl": lambda p: p.write_text(jsonl(DOCS) + "\n"),
    "lines.json": lambda p: p.write_text(jsonl(DOCS)),
    "array.json": lambda p: p.write_text(json.dumps([{"text": t} for t in DOCS])),
    "pretty.json": lambda p: p.write_text(json.dumps([{"text": t, "meta": {"n": [1, 2]}} for t in DOCS], indent=2)),
    "objects.json": lambda p: p.write_text("\n".join(json.dumps({"text": t}, indent=4) for t in DOCS)),
    "a.parquet": lambda p: write_parquet(p, DOCS, row_group_size=2),
    "a.arrow": lambda p: write_arrow_stream(p, DOCS),
    "a.txt.gz": lambda p: p.write_bytes(gzip.compress(b"one\nfile\n")),
    "a.jsonl.zst": lambda p: p.write_bytes(zstandard.ZstdCompressor().compress(jsonl(DOCS).encode())),
    "a.jsonl.gz": lambda p: p.write_bytes(gzip.compress(jsonl(DOCS).encode())),
    "a.json.zst": lambda p: p.write_bytes(zstandard.ZstdCompressor().compress(json.dumps([{"text": t} for t in DOCS]).encode())),
    "a.parquet.gz": lambda p: p.write_bytes(gzip.compress(write_parquet(p, DOCS, 1).read_bytes())),
    "a.parquet.zst": lambda p: p.write_bytes(zstandard.ZstdCompressor().compress(write_parquet(p, DOCS, 1).read_bytes())),
}  # fmt: skip
WHOLE = {"a.txt": ["one\nfile\n"], "a.md": ["# one\n\nfile\n"], "a.txt.gz": ["one\nfile\n"]}


@pytest.mark.parametrize("name", sorted(KINDS))
def test_each_kind(tmp_path, name):
    KINDS[name](tmp_path / name)
    assert read(tmp_path / name) == WHOLE.get(name, DOCS)


def test_text_field_names_the_key_or_column(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"content": t, "text": 1}) + "\n" for t in DOCS))
    write_parquet(tmp_path / "b.parquet", DOCS, field="content")
    assert read(tmp_path, text_field="content") == DOCS + DOCS


def test_parquet_is_read_a_row_group_at_a_time(tmp_path):
    """The second row group's data is destroyed: a reader that reads row group by row group yields the
    first group's rows before it meets the damage (a whole-file read fails at once)."""
    path = write_parquet(tmp_path / "a.parquet", [f"row {i} " + "x" * 200 for i in range(6)], row_group_size=3)
    col = pq.ParquetFile(path).metadata.row_group(1).column(0)
    raw = bytearray(path.read_bytes())
    start = col.data_page_offset
    raw[start : start + col.total_compressed_size] = b"\xff" * col.total_compressed_size
    path.write_bytes(bytes(raw))
    docs = iter_texts(path)
    assert [next(docs) for _ in range(3)] == [f"row {i} " + "x" * 200 for i in range(3)]
    with pytest.raises(CorpusError, match=r"a\.parquet' is not a valid parquet file .*; re-create or re-download") as e:
        next(docs)
    assert "\n" not in str(e.value)


def test_json_is_parsed_incrementally(tmp_path, monkeypatch):
    """Read 7 characters at a time, values cut anywhere still parse; and a document comes out before the
    damaged end of the file is read."""
    monkeypatch.setattr(sources, "READ_CHARS", 7)
    (tmp_path / "a.json").write_text(json.dumps([{"text": t} for t in DOCS], indent=2))
    assert read(tmp_path / "a.json") == DOCS
    (tmp_path / "b.json").write_text(json.dumps([{"text": t} for t in DOCS]) + "\n" * 40 + '{"te')
    docs = iter_texts(tmp_path / "b.json")
    assert next(docs) == DOCS[0]
    with pytest.raises(CorpusError, match=r"b\.json' line 41 is not valid JSON"):
        list(docs)


def test_saved_dataset_folder(tmp_path, capsys):
    folder = save_to_disk_layout(tmp_path / "ds", [DOCS[:2], DOCS[2:]])
    [src] = expand_sources([folder])
    assert src.files == (folder / "data-00000-of-00002.arrow", folder / "data-00001-of-00002.arrow")
    assert list(iter_texts(src)) == DOCS
    # inside a walked folder it is one source too: its json files are not read as data, nothing is skipped
    (tmp_path / "a.txt").write_text("before")
    assert read(tmp_path) == ["before", *DOCS]
    assert capsys.readouterr().err == ""
    # a parquet folder in the same layout
    pq_folder = tmp_path / "pq"
    pq_folder.mkdir()
    write_parquet(pq_folder / "data.parquet", DOCS)
    (pq_folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data.parquet"}]}))
    (pq_folder / "dataset_info.json").write_text("{}")
    assert read(pq_folder) == DOCS


def test_saved_dataset_dict_asks_for_a_split(tmp_path):
    save_to_disk_layout(tmp_path / "dd" / "train", [DOCS])
    (tmp_path / "dd" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    with pytest.raises(CorpusError, match=r"'.*dd' is a saved DatasetDict; pass one of its splits, e.g. '.*dd/train'"):
        expand_sources([tmp_path / "dd"])


def test_walk_is_sorted_recursive_and_filtered(tmp_path):
    (tmp_path / "sub" / "deep").mkdir(parents=True)
    (tmp_path / "b.txt").write_text("b")
    (tmp_path / "sub" / "a.jsonl").write_text(jsonl(["sub a"]))
    (tmp_path / "sub" / "deep" / "c.md").write_text("deep c")
    (tmp_path / "sub" / "skip.txt").write_text("skip")
    (tmp_path / ".hidden.txt").write_text("hidden")
    assert read(tmp_path) == ["b", "sub a", "deep c", "skip"]
    assert read(tmp_path, include=["*.jsonl", "*.md"]) == ["sub a", "deep c"]
    assert read(tmp_path, exclude=["skip.txt", "sub/deep/*"]) == ["b", "sub a"]
    assert read(tmp_path, include=["sub/*"], exclude=["*.md"]) == ["sub a", "skip"]


def test_unknown_kinds_are_skipped_in_one_line_or_refused(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("a")
    for name in ("x.png", "y.png", "z.bin", "README"):
        (tmp_path / name).write_bytes(b"\x89PNG\xff")
    assert read(tmp_path) == ["a"]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("skipped 4 files of no known kind (.png x2, (no suffix), .bin): ")
    assert err[0].endswith("; --strict refuses them")
    with pytest.raises(CorpusError, match=r"'.*README' is of no known kind \(.*\); remove it, --exclude it, or drop"):
        read(tmp_path, strict=True)
    assert read(tmp_path, strict=True, exclude=["*.png", "*.bin", "README"]) == ["a"]


def test_a_file_named_explicitly_is_read_as_text_whatever_its_suffix(tmp_path):
    (tmp_path / "input").write_text("tiny shakespeare")
    assert read(tmp_path / "input") == ["tiny shakespeare"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("a.txt.gz", lambda: b"\x1f\x8bnot gzip at all", r"a\.txt\.gz' is not a valid gzip file"),
        ("a.jsonl.gz", lambda: gzip.compress(jsonl(DOCS).encode())[:-12], r"a\.jsonl\.gz' is not a valid gzip file"),
        ("a.jsonl.zst", lambda: b"(\xb5/\xfd garbage", r"a\.jsonl\.zst' is not a valid zstd file"),
        ("a.parquet", lambda: b"PAR1 not really PAR1", r"a\.parquet' is not a valid parquet file"),
        ("a.txt", lambda: "caf\xe9".encode("latin-1"), r"a\.txt' is not UTF-8 text; convert it"),
        ("a.jsonl", lambda: b'{"text": "caf\xe9"}\n', r"a\.jsonl' is not UTF-8 text; convert it"),
        ("a.jsonl", lambda: jsonl(["ok"], id=1).encode() + b'{"body": "x", "id": 2}\n',
         r"a\.jsonl' record 2 has no string \"text\" field \(its keys: body, id\); pass --text-field"),
        ("a.json", lambda: b'{\n  "body": "x"\n}\n',
         r"a\.json' record 1 has no string \"text\" field \(its keys: body\); pass --text-field"),
    ],
)  # fmt: skip
def test_bad_files_are_one_line_naming_file_and_fix(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content())
    with pytest.raises(CorpusError, match=message) as e:
        read(tmp_path / name)
    assert "\n" not in str(e.value)


def test_missing_column_names_the_columns(tmp_path):
    write_parquet(tmp_path / "a.parquet", DOCS, field="content")
    with pytest.raises(CorpusError, match=r"a\.parquet' has no column \"text\" \(its columns: content, id\)"):
        read(tmp_path / "a.parquet")
    save_to_disk_layout(tmp_path / "ds", [DOCS])
    with pytest.raises(CorpusError, match=r"arrow' has no column \"body\" \(its columns: text\); pass --text-field"):
        read(tmp_path / "ds", text_field="body")
    write_parquet(tmp_path / "n.parquet", DOCS)
    with pytest.raises(CorpusError, match=r"n\.parquet' column \"id\" holds int64, not text"):
        read(tmp_path / "n.parquet", text_field="id")


def test_empty_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match=r"folder '.*empty' holds no files; check the path"):
        expand_sources([tmp_path / "empty"])
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(b"\x89PNG")
    with pytest.raises(CorpusError, match=r"folder '.*pics' holds no files of a known kind \(\.txt .*\); check"):
        expand_sources([tmp_path / "pics"])
    with pytest.raises(CorpusError, match=r"folder '.*' holds no files; check the path and --include/--exclude"):
        expand_sources([tmp_path / "pics"], exclude=["*.png"])


class DatasetLike:
    """What kimi needs of a `datasets.Dataset`: iteration over dicts (the class itself is never imported)."""

    def __init__(self, rows):
        self.rows = rows

    def __iter__(self):
        return iter(self.rows)


def test_iterables_of_strings_or_dicts():
    assert list(iter_records(DOCS + ["  "])) == DOCS
    assert list(iter_records(DatasetLike([{"body": t, "id": 1} for t in DOCS]), "body")) == DOCS
    with pytest.raises(CorpusError, match=r"'train texts' record 2 has no string \"text\" field \(its keys: body\)"):
        list(iter_records([{"text": "a"}, {"body": "b"}], where="train texts"))


def test_jsonl_lines_are_split_at_newlines_only(tmp_path):
    """JSON may hold U+2028 or a form feed unescaped (json.dumps(..., ensure_ascii=False)); the reader this
    replaced split lines with str.splitlines and refused such files."""
    docs = ["line\u2028separator", "form\x0cfeed", "next\x85line"]
    (tmp_path / "a.jsonl").write_text(jsonl(docs))
    assert read(tmp_path / "a.jsonl") == docs
