"""The checkpoint directory: steps ordered by number, never as strings; a damaged or missing meta.json."""

import os

import pytest

from kimi.checkpoint import CheckpointError, CheckpointStore, complete_steps, read_meta, resolve, verify


def _step(root, n, complete=True):
    p = root / f"step_{n:06d}"
    p.mkdir()
    if complete:
        (p / "meta.json").write_text("{}")
    return p


def test_steps_past_999999_sort_by_number(tmp_path):
    """`step_1000000` sorts before `step_999998` as a string; `latest` fallback and rotation must not."""
    for n in (999998, 1000000, 999999):
        _step(tmp_path, n)
    _step(tmp_path, 1000001, complete=False)
    assert [p.name for p in complete_steps(tmp_path)] == ["step_999998", "step_999999", "step_1000000"]
    store = CheckpointStore(tmp_path, keep_last=2)
    assert store.latest().name == "step_1000000"  # no `latest` link: the newest complete step
    assert [p.name for p in store.incomplete_steps()] == ["step_1000001"]
    store._rotate()
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_1000000", "step_1000001"]  # the 2 newest


# ----------------------------------------------------------------------------- a damaged meta.json (issue 17)


def _saved(root):
    """Two real steps through CheckpointStore.save (a trivial engine writer), `latest` -> step_000004."""
    store = CheckpointStore(root / "checkpoints", keep_last=3)
    for step in (2, 4):
        store.save(step, lambda tmp: (tmp / "weights.bin").write_bytes(b"w" * 64), {"step": step}, "a: 1\n", {})
    return store


def test_one_flipped_digit_in_meta_json_blames_meta_json(tmp_path):
    """A checksum digit flipped inside meta.json used to blame the file that checksum names (`weights.bin`
    here, `.metadata` in a DCP step): meta.json now carries its own checksum, and the error names it."""
    store = _saved(tmp_path)
    meta = store.dir / "step_000004" / "meta.json"
    text = meta.read_text()
    i = text.index('"weights.bin": "') + len('"weights.bin": "')
    meta.write_text(text[:i] + ("0" if text[i] != "0" else "1") + text[i + 1 :])
    with pytest.raises(CheckpointError, match=r"step_000004/meta\.json' is damaged .*older checkpoint") as e:
        verify(store.dir / "step_000004")
    assert "weights.bin" not in str(e.value)
    verify(store.dir / "step_000002")  # the untouched one still passes


def test_broken_json_in_meta_json_names_the_file(tmp_path):
    store = _saved(tmp_path)
    meta = store.dir / "step_000004" / "meta.json"
    meta.write_text(meta.read_text().replace(",", "", 1))
    for read in (verify, read_meta):
        with pytest.raises(CheckpointError, match=r"step_000004/meta\.json' is not valid JSON \(Expecting"):
            read(store.dir / "step_000004")


def test_newest_step_without_meta_json_falls_back_to_the_newest_complete_step(tmp_path):
    """`latest` -> a step whose meta.json is gone: the store (and `resolve`, which generate and evaluate
    use) fall back to the newest complete step instead of refusing with 'holds no checkpoint'."""
    store = _saved(tmp_path)
    (store.dir / "step_000004" / "meta.json").unlink()
    assert store.latest().name == "step_000002" and not store.link_ok()
    for given in (store.dir / "latest", store.dir, tmp_path):
        assert resolve(given).name == "step_000002"
    with pytest.raises(CheckpointError, match=r"step_000004' has no meta\.json.*older checkpoint"):
        resolve(store.dir / "step_000004")  # a step named outright is not swapped for another


def test_checkpoint_files_get_the_mode_the_umask_gives(tmp_path):
    """Prepared shards came out 0600 (tempfile.mkstemp, issue 17); checkpoints never went through it. This
    keeps it so: every file of a step, meta.json included, is 0666 less the umask."""
    old = os.umask(0o027)
    try:
        store = _saved(tmp_path)
    finally:
        os.umask(old)
    modes = {str(p.relative_to(store.dir)): oct(p.stat().st_mode & 0o777) for p in store.dir.rglob("*") if p.is_file()}
    assert "step_000004/meta.json" in modes and set(modes.values()) == {"0o640"}, modes


# ----------------------------------------------------------------------------- checksums hashed per rank (issue 17)


def _save_at_world(rank, world, root):
    """Every rank writes files of uneven sizes into the step (as DCP shards and the small files are), then
    the real CheckpointStore.save: each rank hashes its share, rank 0 gathers them into meta.json."""
    from pathlib import Path

    from kimi.checkpoint.store import _files, share

    def write(tmp):
        for i, size in enumerate((5000, 300, 70_000, 12)):
            (tmp / f"__{rank}_{i}.distcp").write_bytes(bytes([rank * 16 + i]) * size * (rank + 1))

    final = CheckpointStore(Path(root) / "checkpoints").save(4, write, {"step": 4}, "a: 1\n", {})
    return [str(p.relative_to(final)) for p in share(_files(final), rank, world)]


def test_checksums_hashed_per_rank_equal_one_process_hashing(tmp_path):
    """At world 2 each rank hashes a share of the files (by bytes, not by count), and the meta.json rank 0
    writes holds exactly what one process hashing every file writes (kimi.checkpoint.store.checksums)."""
    import json

    from kimi.checkpoint.store import checksums
    from tests.dist_utils import run_distributed

    shares = run_distributed(_save_at_world, 2, args=(str(tmp_path),))
    step = tmp_path / "checkpoints" / "step_000004"
    meta = read_meta(step)  # its own meta_sha256 checks out
    one = checksums(step)
    assert meta["checksums"] == one and list(meta["checksums"]) == list(one)  # same content, same order
    assert meta["world_size"] == 2 and len(one) == 8 + 4  # 8 shards, 2 rng files, train_state.pt, config.yaml
    assert set(shares[0]) | set(shares[1]) == set(one) and not set(shares[0]) & set(shares[1])
    sizes = [sum((step / f).stat().st_size for f in s) for s in shares]
    assert min(sizes) > 0.3 * max(sizes), sizes  # each rank reads a fair part of the bytes
    assert json.loads((step / "meta.json").read_text())["checksums"] == one
