"""`python -m kimi.prepare --tokenizer tiktoken:PATH | hf:PATH` end to end, with tokenizer files the tests
write themselves: shard contents, the manifest's tokenizer files and hashes, re-preparing when a file
changes, uint32 shards for ids above 65,535, one-line refusals (bad file, small model.vocab_size, changed
tokenizer), and whole-document encoding for pre-tokenizers that chunking could split differently."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kimi.config import DataConfig
from kimi.data import shards
from kimi.data import tokenizer as tk
from kimi.data.dataset import DataError, build_dataset
from kimi.files import sha256_file
from kimi.prepare import main
from tests.unit.test_tokenizer_files import write_bpe, write_hf

DOCS = ["the cat sat on the mat.\nthe end.", "the dog ate the hat. <|endoftext|> stays text, 日本"]


@pytest.fixture
def files(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    for i, doc in enumerate(DOCS):
        (d / f"{i}.txt").write_text(doc)
    (tmp_path / "val.txt").write_text("the val text.")
    return d, tmp_path / "val.txt"


def run_prepare(files, out, name, *extra):
    tk._cached.cache_clear()  # the tests rewrite tokenizer files under the same names
    d, val = files
    argv = ["--files", str(d), "--val-files", str(val), "--out", str(out), "--tokenizer", name]
    return main([*argv, "--num-workers", "1", "--no-progress", *extra])


def tokens(split_dir):
    _, maps = shards.open_split(split_dir, verify=True)
    return np.concatenate([np.asarray(m) for m in maps])


def expected(name, docs):
    enc = tk.get_tokenizer(name)
    return np.concatenate([[enc.eot_token] + enc.encode_ordinary(d) for d in docs])


@pytest.mark.parametrize("kind", ["tiktoken", "hf"])
def test_prepare_with_a_tokenizer_file(tmp_path, files, kind, capsys):
    path = write_bpe(tmp_path / "tok.model") if kind == "tiktoken" else write_hf(tmp_path / "tokenizer.json")
    name = f"{kind}:{path}"
    assert run_prepare(files, tmp_path / "out", name) == 0
    m = shards.read_manifest(tmp_path / "out" / "train")
    assert m["tokenizer"] == name and m["tokenizer_files"] == {path.name: sha256_file(path)}
    assert m["dtype"] == "uint16" and m["vocab_size"] == tk.get_tokenizer(name).n_vocab
    assert np.array_equal(tokens(tmp_path / "out" / "train"), expected(name, DOCS))
    ds = build_dataset(DataConfig(dataset=str(tmp_path / "out"), tokenizer_name=name), 4, 512, seed=0)
    assert ds.vocab_size == m["vocab_size"]
    assert "tokenised with" not in capsys.readouterr().err


def test_changed_tokenizer_file_reprepares_and_old_data_is_refused(tmp_path, files, capsys):
    path = write_bpe(tmp_path / "tok.model")
    name = f"tiktoken:{path}"
    assert run_prepare(files, tmp_path / "out", name) == 0
    before = tokens(tmp_path / "out" / "train")
    write_bpe(path, merges=(b"th", b"he"))  # a different vocabulary under the same name
    cfg = DataConfig(dataset=str(tmp_path / "out"), tokenizer_name=name)
    with pytest.raises(DataError, match=r"tokenised with tiktoken:.*differ.*re-run python -m kimi\.prepare"):
        build_dataset(cfg, 4, 512, seed=0)
    assert run_prepare(files, tmp_path / "out", name) == 0
    after = tokens(tmp_path / "out" / "train")
    assert not np.array_equal(before, after) and np.array_equal(after, expected(name, DOCS))
    assert build_dataset(cfg, 4, 512, seed=0).vocab_size == 258 + 1
    capsys.readouterr()
    assert run_prepare(files, tmp_path / "out", name) == 0  # unchanged now: verified and left as it is
    assert shards.read_manifest(tmp_path / "out" / "train")["tokenizer_files"] == {"tok.model": sha256_file(path)}


def test_ids_above_uint16_write_uint32_shards_and_small_vocab_is_refused(tmp_path, files):
    path = write_bpe(tmp_path / "tiktoken.model")
    (tmp_path / "tiktoken.model.json").write_text(
        json.dumps({"special_tokens": {"[BOS]": 70000, "[EOS]": 70001}, "eot": "[EOS]"})
    )
    name = f"tiktoken:{path}"
    assert run_prepare(files, tmp_path / "out", name) == 0
    split = tmp_path / "out" / "train"
    m = shards.read_manifest(split)
    assert m["dtype"] == "uint32" and m["vocab_size"] == 70002 and m["eot_token"] == 70001
    assert set(m["tokenizer_files"]) == {"tiktoken.model", "tiktoken.model.json"}
    assert shards.read_header(split / m["shards"][0]["file"])[0] == np.dtype("<u4")
    got = tokens(split)
    assert np.array_equal(got, expected(name, DOCS)) and (got == 70001).sum() == len(DOCS)
    cfg = DataConfig(dataset=str(tmp_path / "out"), tokenizer_name=name)
    with pytest.raises(DataError, match=r"vocabulary 70002\) but model.vocab_size=512; set --model.vocab_size=70002"):
        build_dataset(cfg, 4, 512, seed=0)
    ds = build_dataset(cfg, 4, 70002, seed=0)
    x, y = ds.get_batch(step=0, start=0, count=4)
    assert int(max(x.max(), y.max())) < 70002 and x.dtype == torch.long


@pytest.mark.parametrize("kind", ["tiktoken", "hf"])
def test_unparsable_tokenizer_file_exits_2_in_one_line(tmp_path, files, kind, capsys):
    path = tmp_path / "broken"
    path.write_text("{garbage\n")
    assert run_prepare(files, tmp_path / "out", f"{kind}:{path}") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(path) in err and err.startswith("error:")
    assert not list((tmp_path / "out").rglob("manifest.json"))


def test_documents_are_encoded_whole_when_the_pattern_is_not_gpt2s(tmp_path):
    """Kimi K2's pattern joins a symbol run with the newlines after it (` ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*`);
    pipeline.chunk_text cuts before a newline, which would split such a piece. Over CHUNK_CHARS, the
    shards must still hold the document's own encoding."""
    from kimi.data.corpora import texts_corpus
    from kimi.data.pipeline import CHUNK_CHARS, prepare

    path = write_bpe(tmp_path / "tok.model")
    (tmp_path / "tok.model.json").write_text(json.dumps({"pat_str": r"\p{L}+|[^\s\p{L}]+[\r\n]*|\s+"}))
    doc = "ab.\n" * (CHUNK_CHARS // 4 + 1000)
    name = f"tiktoken:{path}"
    tk._cached.cache_clear()
    cfg = DataConfig(tokenizer_name=name, num_workers=1)
    prepare(texts_corpus("long", [doc], ["val."]), tmp_path / "out", cfg, progress=False)
    enc = tk.get_tokenizer(name)
    assert enc.encode_ordinary("ab.\n") == [ord("a"), ord("b"), 260]  # the ".\n" merge
    assert np.array_equal(tokens(tmp_path / "out" / "train"), [enc.eot_token, *enc.encode_ordinary(doc)])


def test_checkpoint_carries_the_tokenizer_files_and_generate_needs_no_flag(tmp_path, files):
    """prepare -> train 2 steps (vocab exactly the tokenizer's: generate does not mask ids the tokenizer lacks)
    -> the step directory holds tokenizer/ with the files and meta.json their
    sha256 -> with the original files deleted, generate still decodes through the checkpoint's copies."""
    import subprocess
    import sys

    from kimi.checkpoint import read_meta, resolve

    root = Path(__file__).resolve().parents[2]
    (tmp_path / "tok").mkdir()
    path = write_bpe(tmp_path / "tok" / "tiktoken.model")
    (tmp_path / "tok" / "tiktoken.model.json").write_text(json.dumps({"special_tokens": {"[EOS]": 261}}))
    name = f"tiktoken:{path}"
    assert run_prepare(files, tmp_path / "data", name) == 0
    train = [sys.executable, "-m", "kimi.train", "--config", "configs/debug.yaml", f"--out-dir={tmp_path / 'run'}",
             "--logging.mlflow=false", "--model.vocab_size=262", f"--data.dataset={tmp_path / 'data'}",
             "--train.max_steps=2", "--data.block_size=8", f"--data.tokenizer_name={name}"]  # fmt: skip
    res = subprocess.run(train, cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    step = resolve(tmp_path / "run")
    want = {
        "tiktoken.model": sha256_file(path),
        "tiktoken.model.json": sha256_file(path.with_name(path.name + ".json")),
    }
    assert read_meta(step)["tokenizer_files"] == want
    assert {f.name: sha256_file(f) for f in (step / "tokenizer").iterdir()} == want
    for f in (tmp_path / "tok").iterdir():
        f.unlink()
    gen = subprocess.run(
        [sys.executable, "-m", "kimi.generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "the cat"]
        + ["--max-new-tokens", "6", "--seed", "1"],
        cwd=root, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("the cat")
