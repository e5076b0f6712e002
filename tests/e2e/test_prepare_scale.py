"""Prepare at scale, with real processes: a SIGKILLed `python -m kimi.prepare` leaves no split that looks
complete and a re-run goes on from its last shard to the very bytes of an uninterrupted run (one worker
there, two here: the output does not depend on the worker count); changed inputs restart instead."""

import json
import os
import random
import signal
import subprocess
import sys
import time

from kimi.data import shards

SHARD_TOKENS = 20_000


def _corpus(path, docs: int, seed: int = 0):
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    with open(path, "w") as f:
        for _ in range(docs):
            f.write(json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(100, 600)))}) + "\n")


def _prepare(train, val, out, workers, **popen):
    cmd = [sys.executable, "-m", "kimi.prepare", "--files", str(train), "--val-files", str(val), "--out", str(out),
           "--shard-tokens", str(SHARD_TOKENS), "--num-workers", str(workers), "--no-progress"]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _kill_after_shards(proc, split_dir, n: int) -> int:
    """SIGKILL the prepare (and its workers: the process group, as a scheduler would) once `n` shards are
    recorded as done; returns how many were."""
    progress = split_dir / ".progress.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            done = len(json.loads(progress.read_text())["shards"])
        except (OSError, ValueError):
            done = 0
        if done >= n:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            # Read again: a worker may have recorded another shard between the read above and the kill.
            return len(json.loads(progress.read_text())["shards"])
        time.sleep(0.02)
    raise AssertionError(f"prepare ended (rc {proc.poll()}) before writing {n} shards: make the corpus bigger")


def test_killed_prepare_resumes_to_the_bytes_of_an_uninterrupted_run(tmp_path):
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    _corpus(train, 6000)
    _corpus(val, 50, seed=1)
    ref = _prepare(train, val, tmp_path / "ref", workers=1)
    assert ref.wait() == 0, ref.stdout.read()

    out = tmp_path / "out"
    proc = _prepare(train, val, out, workers=2, start_new_session=True)
    done = _kill_after_shards(proc, out / "train", 3)
    assert not (out / "train" / "manifest.json").exists()  # the killed split does not look complete
    try:
        shards.read_manifest(out / "train")
        raise AssertionError("an interrupted split read as a dataset")
    except shards.ShardError as e:
        assert "interrupted prepare" in str(e)

    again = _prepare(train, val, out, workers=2)
    log = again.communicate()[0]
    assert again.returncode == 0, log
    assert f"resuming an interrupted prepare after {done} shard(s)" in log
    for split in ("train", "val"):
        assert (out / split / "manifest.json").read_bytes() == (tmp_path / "ref" / split / "manifest.json").read_bytes()
        assert not (out / split / ".progress.json").exists()
    manifest, _ = shards.open_split(out / "train", verify=True)
    assert len(manifest["shards"]) > done


def test_changed_input_or_damaged_shard_restarts_from_scratch(tmp_path):
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    _corpus(train, 6000)
    _corpus(val, 50, seed=1)
    out = tmp_path / "out"
    _kill_after_shards(_prepare(train, val, out, workers=2, start_new_session=True), out / "train", 2)
    (out / "train" / "shard_00001.bin").write_bytes(b"garbage")  # a resume must not build on it
    again = _prepare(train, val, out, workers=1)
    log = again.communicate()[0]
    assert again.returncode == 0 and "resuming" not in log, log
    shards.open_split(out / "train", verify=True)

    _corpus(train, 6000, seed=7)
    _kill_after_shards(_prepare(train, val, out, workers=2, start_new_session=True), out / "train", 2)
    _corpus(train, 6000)  # back to the first text: the recorded shards belong to the other one
    again = _prepare(train, val, out, workers=2)
    log = again.communicate()[0]
    assert again.returncode == 0 and "resuming" not in log, log
    ref = _prepare(train, val, tmp_path / "ref", workers=1)
    assert ref.wait() == 0
    assert (out / "train" / "manifest.json").read_bytes() == (tmp_path / "ref" / "train" / "manifest.json").read_bytes()
