"""Shard format and datasets: round trips, refusal of damaged shards, the (seed, step) window stream,
rank slicing at several world sizes, resume, validation windows and build_dataset's errors."""

import json
import os

import numpy as np
import pytest
import torch

from kimi.config import DataConfig
from kimi.data import shards
from kimi.data.dataset import (
    BatchIterator,
    DataError,
    ShardDataset,
    ToyDataset,
    build_dataset,
    window_starts,
)
from kimi.files import sha256_file


def make_split(split_dir, tokens, shard_tokens, vocab_size=50257, corpus="unit", split="train"):
    """A split written with the shard primitives (prepare's own path is tested in test_prepare.py)."""
    split_dir.mkdir(parents=True, exist_ok=True)
    dtype = shards.dtype_for_vocab(vocab_size)
    entries = []
    for i in range(0, len(tokens), shard_tokens):
        name = f"shard_{len(entries):05d}.bin"
        chunk = np.asarray(tokens[i : i + shard_tokens], dtype=dtype)
        entries.append(
            {"file": name, "num_tokens": int(chunk.size), "sha256": shards.write_shard(split_dir / name, chunk)}
        )
    manifest = {"shards": entries, "vocab_size": vocab_size, "corpus": corpus, "split": split, "tokenizer": "gpt2",
                "fingerprint": f"fp-{corpus}-{len(tokens)}"}  # fmt: skip
    shards.write_manifest(split_dir, manifest)
    return split_dir


@pytest.fixture
def stream():
    return np.random.default_rng(0).integers(0, 50257, 5000)


@pytest.fixture
def ds(tmp_path, stream):
    return ShardDataset(make_split(tmp_path / "train", stream, shard_tokens=700), block_size=32, seed=7)


# ----------------------------------------------------------------------------- shard files


@pytest.mark.parametrize("vocab,high", [(50257, 50257), (100_000, 100_000)])
def test_shard_round_trip(tmp_path, vocab, high):
    tokens = np.random.default_rng(1).integers(0, high, 1000).astype(shards.dtype_for_vocab(vocab))
    assert tokens.dtype == (np.uint16 if vocab <= 65536 else np.uint32)
    sha = shards.write_shard(tmp_path / "s.bin", tokens)
    assert sha == sha256_file(tmp_path / "s.bin")
    assert (tmp_path / "s.bin").stat().st_size == shards.HEADER_BYTES + tokens.nbytes
    head = (tmp_path / "s.bin").read_bytes()[: shards.HEADER_BYTES]
    assert head[:8] == b"NKSHARD\0" and head[24:] == bytes(shards.HEADER_BYTES - 24)
    dtype, n = shards.read_header(tmp_path / "s.bin")
    assert (dtype, n) == (tokens.dtype, 1000)
    mm = shards.open_shard(tmp_path / "s.bin", num_tokens=1000, sha256=sha)
    assert isinstance(mm, np.memmap) and np.array_equal(mm, tokens)
    assert not list(tmp_path.glob(".*tmp"))  # the temp file was renamed away


def test_dtype_boundary():
    assert shards.dtype_for_vocab(65536) == np.uint16 and shards.dtype_for_vocab(65537) == np.uint32


def test_truncated_shard_refused(ds, tmp_path):
    path = tmp_path / "train" / "shard_00002.bin"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(shards.ShardError, match=r"shard_00002\.bin' is truncated.*re-run python -m kimi\.prepare"):
        ShardDataset(tmp_path / "train", 32)


def test_bad_magic_refused(ds, tmp_path):
    path = tmp_path / "train" / "shard_00001.bin"
    path.write_bytes(b"XXXXXXXX" + path.read_bytes()[8:])
    with pytest.raises(shards.ShardError, match=r"shard_00001\.bin' is not a nanoKimi token shard.*re-run"):
        ShardDataset(tmp_path / "train", 32)


def _flip_bytes(path, n=1000, keep_mtime=False):
    st = path.stat()
    raw = bytearray(path.read_bytes())
    for i in np.linspace(shards.HEADER_BYTES, len(raw) - 1, n).astype(int):
        raw[i] ^= 0xFF  # same size, same header: only the hash can tell
    path.write_bytes(bytes(raw))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_corrupt_shard_refused_by_default(ds, tmp_path):
    _flip_bytes(tmp_path / "train" / "shard_00003.bin")
    ShardDataset(tmp_path / "train", 32, verify=False)  # the cheap checks pass ...
    with pytest.raises(DataError, match=r"shard_00003\.bin' is corrupt.*re-run python -m kimi\.prepare"):
        build_dataset(DataConfig(dataset=str(tmp_path)), 32, 50304, seed=0)  # ... the default one does not


def test_shard_verdicts_are_cached_per_file_version(ds, tmp_path, monkeypatch):
    split = tmp_path / "train"
    verdicts = json.loads((split / shards.VERIFIED).read_text())  # the fixture's open hashed each shard once
    assert sorted(verdicts) == [f"shard_{i:05d}.bin" for i in range(8)]
    # The cache is what is consulted: bytes changed behind an unchanged (size, mtime) pass unseen (the
    # documented limit), and the same damage with a new mtime is hashed again and refused.
    _flip_bytes(split / "shard_00005.bin", keep_mtime=True)
    ShardDataset(split, 32)
    (split / "shard_00005.bin").touch()
    with pytest.raises(shards.ShardError, match=r"shard_00005\.bin' is corrupt"):
        ShardDataset(split, 32)
    # A data directory that refuses our file (here .verified.json is a directory: writes fail with an
    # OSError, as in a read-only directory): verdicts go to the nanoKimi cache dir instead ...
    other = make_split(tmp_path / "other" / "train", np.arange(3000) % 50257, shard_tokens=700)
    (other / shards.VERIFIED).mkdir()
    monkeypatch.setenv("NANOKIMI_CACHE", str(tmp_path / "cache"))
    ShardDataset(other, 32)
    assert len(json.loads(next((tmp_path / "cache" / "verified").glob("*.json")).read_text())) == 5
    # ... and where nothing can be cached, every open still verifies.
    monkeypatch.setenv("NANOKIMI_CACHE", str(other / "shard_00000.bin" / "below-a-file"))
    _flip_bytes(other / "shard_00001.bin")
    with pytest.raises(shards.ShardError, match=r"shard_00001\.bin' is corrupt"):
        ShardDataset(other, 32)


def test_manifest_count_mismatch_and_missing_manifest(ds, tmp_path):
    m = shards.read_manifest(tmp_path / "train")
    m["shards"][0]["num_tokens"] += 1
    shards.write_manifest(tmp_path / "train", m)
    with pytest.raises(shards.ShardError, match=r"shard_00000\.bin' holds 700 tokens but the manifest says 701"):
        ShardDataset(tmp_path / "train", 32)
    (tmp_path / "train" / "manifest.json").unlink()
    with pytest.raises(shards.ShardError, match=r"manifest\.json' is missing"):
        ShardDataset(tmp_path / "train", 32)


# ----------------------------------------------------------------------------- windows


def test_windows_read_the_concatenated_shards(ds, stream):
    assert ds.num_tokens == 5000 and ds.vocab_size == 50257 and ds.num_windows == 5000 - 32
    starts = window_starts(7, 3, 0, 64, ds.num_windows)
    x, y = ds.get_batch(3, 0, 64)
    assert x.shape == y.shape == (64, 32) and x.dtype == y.dtype == torch.long
    for row, s in enumerate(starts):
        assert torch.equal(x[row], torch.from_numpy(stream[s : s + 32]))
        assert torch.equal(y[row], torch.from_numpy(stream[s + 1 : s + 33]))
    # starts that straddle shard boundaries (700, 1400, ...) and the very last window
    probe = np.array([690, 1399, 4999 - 32])
    assert np.array_equal(ds._tokens(probe), np.stack([stream[s : s + 33] for s in probe]))


def test_windows_depend_only_on_seed_step_and_index(ds):
    a = window_starts(7, 5, 0, 32, ds.num_windows)
    assert np.array_equal(a, window_starts(7, 5, 0, 32, ds.num_windows))
    assert np.array_equal(a[10:20], window_starts(7, 5, 10, 10, ds.num_windows))  # no dependence on the batch size
    assert not np.array_equal(a, window_starts(7, 6, 0, 32, ds.num_windows))
    assert not np.array_equal(a, window_starts(8, 5, 0, 32, ds.num_windows))
    assert torch.equal(ds.get_batch(5, 4, 3)[0], ds.get_batch(5, 0, 8)[0][4:7])


def test_window_starts_are_uniform():
    counts = np.bincount(np.concatenate([window_starts(1, s, 0, 1000, 10) for s in range(20)]), minlength=10)
    assert counts.sum() == 20_000 and counts.min() > 1800 and counts.max() < 2200  # expected 2000 each (sd ~42)


def test_eval_batches_are_fixed(ds):
    a, b = ds.eval_batches(3, 4), ds.eval_batches(3, 4)
    assert len(a) == 3 and all(x.shape == (4, 32) for x, _ in a)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    firsts = torch.stack([x[:, 0] for x, _ in a]).flatten()
    assert len(set(firsts.tolist())) > 6  # spread over the data, not one window repeated


# ----------------------------------------------------------------------------- batch iterator


@pytest.mark.parametrize("dp_world,micro", [(1, 16), (1, 4), (2, 4), (4, 2), (4, 4)])
def test_rank_slices_concatenate_to_the_global_batch(ds, dp_world, micro):
    G = 16
    its = [BatchIterator(ds, G, micro, rank, dp_world) for rank in range(dp_world)]
    assert its[0].grad_accum == G // (micro * dp_world)
    for step in range(3):
        xs, ys = zip(*[xy for it in its for xy in it.next_step()])  # rank-major, then micro-batches
        gx, gy = ds.get_batch(step, 0, G)
        assert torch.equal(torch.cat(xs), gx) and torch.equal(torch.cat(ys), gy)


def test_indivisible_batch_is_a_clear_error(ds):
    with pytest.raises(DataError, match=r"global_batch_size=10 is not divisible by .* 4 \* 2"):
        BatchIterator(ds, 10, 4, 0, 2)


def test_resume_continues_the_stream_at_another_world_size(ds):
    ref = BatchIterator(ds, 8, 4)
    for _ in range(3):
        ref.next_step()
    state = ref.state_dict()
    assert state["step"] == 3 and state["seed"] == 7
    expected = [torch.cat([x for x, _ in ref.next_step()]) for _ in range(2)]
    resumed = [BatchIterator(ds, 8, 2, rank, 2) for rank in range(2)]
    for it in resumed:
        it.load_state_dict(state)
    got = [torch.cat([x for it in resumed for x, _ in it.next_step()]) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_resume_refuses_another_dataset_or_seed(ds, tmp_path, stream):
    state = BatchIterator(ds, 8, 4).state_dict()
    other = ShardDataset(make_split(tmp_path / "other", stream[:3000], 700, corpus="other"), 32, seed=7)
    with pytest.raises(DataError, match="different dataset"):
        BatchIterator(other, 8, 4).load_state_dict(state)
    reseeded = ShardDataset(tmp_path / "train", 32, seed=8)
    with pytest.raises(DataError, match="--train.seed=7"):
        BatchIterator(reseeded, 8, 4).load_state_dict(state)


# ----------------------------------------------------------------------------- toy data and build_dataset


def test_toy_dataset():
    toy = ToyDataset(vocab_size=100, block_size=16, seed=3)
    x, y = toy.get_batch(0, 0, 8)
    assert x.shape == (8, 16) and int(x.max()) < 100 and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(x, ToyDataset(100, 16, 3).get_batch(0, 0, 8)[0])
    val = ToyDataset(100, 16, 3, split="val")
    assert not torch.equal(val.eval_batches(1, 8)[0][0], toy.eval_batches(1, 8)[0][0])
    # learnable: the stream is made of 64 fixed 8-token phrases (entropy ~ln(64)/8 nat per token)
    rows = toy._data[:8192].reshape(-1, 8)
    assert len(np.unique(rows, axis=0)) <= 64


def test_build_dataset_resolves_root_split_and_sibling(tmp_path, stream):
    make_split(tmp_path / "d" / "train", stream, 1000)
    make_split(tmp_path / "d" / "val", stream[:500], 1000, split="val")
    assert isinstance(build_dataset(DataConfig(), 32, 512, seed=1), ToyDataset)
    for given in ("d", "d/train", "d/val"):
        cfg = DataConfig(dataset=str(tmp_path / given))
        assert build_dataset(cfg, 32, 50304, seed=1, split="train").num_tokens == 5000
        assert build_dataset(cfg, 32, 50304, seed=1, split="val").num_tokens == 500


def test_build_dataset_errors(tmp_path, stream):
    missing = tmp_path / "nope"
    with pytest.raises(DataError) as e:
        build_dataset(DataConfig(dataset=str(missing)), 32, 50304, seed=0)
    assert str(e.value) == (
        f"data directory '{missing}' not found; run python -m kimi.prepare --corpus shakespeare --out {missing}"
    )
    make_split(tmp_path / "d" / "train", stream[:40], 1000)
    with pytest.raises(DataError, match=r"vocabulary 50257\) but model.vocab_size=512"):
        build_dataset(DataConfig(dataset=str(tmp_path / "d")), 8, 512, seed=0)
    with pytest.raises(DataError, match="holds 40 tokens, fewer than block_size"):
        build_dataset(DataConfig(dataset=str(tmp_path / "d")), 64, 50304, seed=0)
