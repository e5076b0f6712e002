"""Faults around checkpoints, driven through the real `python -m kimi.train` process: SIGKILL at every
point of a save, a missing `latest`, corrupt or missing checkpoint files, a full disk, changed config on
resume, unusable output paths. Each test says what the user sees and what state is left."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from kimi.checkpoint import CheckpointError, CheckpointStore, verify
from kimi.config import load_config
from kimi.engine import read_model_state as load_model_state
from kimi.train import train

ROOT = Path(__file__).resolve().parents[2]
DEBUG = ROOT / "configs" / "debug.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "kimi.train", "--config", str(DEBUG), f"--train.out_dir={out}",
            "--logging.mlflow=false", *extra]  # fmt: skip


def _cli(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(out, *extra), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def _one_error_line(res: subprocess.CompletedProcess, *needles: str) -> str:
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _train(out: Path, *extra: str) -> dict:
    return train(load_config(DEBUG, [f"--train.out_dir={out}", "--logging.mlflow=false", *extra]))


# ----------------------------------------------------------------------------- kill during save

# The points of CheckpointStore.save where the hook KIMI_TEST_PAUSE_IN_SAVE=<phase>@<step> holds the process:
# tmp dir made | every rank's files written | meta.json written | renamed to step_N | `latest` swapped.
PHASES = ["tmp", "shards", "meta", "renamed", "linked"]


def _poll(done, proc: subprocess.Popen, what: str, log: Path, deadline_s: float = 240) -> None:
    deadline = time.monotonic() + deadline_s
    while not done():
        assert proc.poll() is None, f"exited {proc.returncode} before {what}: {log.read_text()}"
        assert time.monotonic() < deadline, f"never reached {what}: {log.read_text()}"
        time.sleep(0.05)


def _kill_during_save(out: Path, args: list[str], phase: str, step: int, log: Path, then=None) -> None:
    """Start a run that holds still at `phase` of its save of `step`, and SIGKILL it there (once `then()`
    is true, when given: the run goes on while the save is held)."""
    env = {**ENV, "KIMI_TEST_PAUSE_IN_SAVE": f"{phase}@{step}"}
    with open(log, "w") as f:
        proc = subprocess.Popen(_cmd(out, *args), cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        _poll((out / "paused_in_save").exists, proc, f"{phase}@{step}", log)
        (out / "paused_in_save").unlink()
        if then is not None:
            _poll(then, proc, f"{then.__doc__} while step {step} is held at {phase}", log)
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # no handler runs, nothing is cleaned up
        proc.wait()


@contextmanager
def _uninterrupted(out: Path, args: list[str], log: Path):
    """The reference run, as its own process alongside the body; it must end with exit code 0."""
    with open(log, "w") as f:
        ref = subprocess.Popen(_cmd(out, *args), cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT)
    try:
        yield
        assert ref.wait(timeout=300) == 0, log.read_text()
    finally:
        if ref.poll() is None:
            ref.kill()
            ref.wait()


@pytest.mark.slow
def test_sigkill_at_every_point_of_a_save_loses_nothing(tmp_path):
    """One run killed (real SIGKILL) during five saves in a row, each at a different point, then resumed to
    the end: the losses equal an uninterrupted run's bit for bit, and metrics.jsonl has each step once."""
    args = ["--train.max_steps=12", "--train.ckpt_interval=2"]
    ref_out, out, ckpts = tmp_path / "ref", tmp_path / "run", tmp_path / "run" / "checkpoints"
    with _uninterrupted(ref_out, args, tmp_path / "ref.log"):
        for i, phase in enumerate(PHASES):
            step = 2 * (i + 1)  # each run resumes from an earlier step (or 0) and dies saving this one
            _kill_during_save(out, args, phase, step, tmp_path / f"kill_{phase}.log")
            latest = CheckpointStore(ckpts).latest()
            if latest is not None:  # whatever the kill left, the checkpoint `latest` names is whole
                verify(latest)
        res = _cli(out, *args)
        assert res.returncode == 0, res.stderr
    rows, ref_rows = _rows(out), _rows(ref_out)
    assert [r["step"] for r in rows] == list(range(1, 13))  # none lost, none doubled
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]  # bit for bit
    assert [r.get("val_loss") for r in rows] == [r.get("val_loss") for r in ref_rows]
    assert not list(ckpts.glob("*.tmp"))


def test_sigkill_during_an_async_save_keeps_the_previous_step(tmp_path):
    """train.async_checkpoint: the shards are written in the background while training goes on. A real
    SIGKILL while that write is held open (KIMI_TEST_PAUSE_IN_SAVE=writing: the shards on disk, DCP's
    index not) and while its files wait to be hashed leaves `latest` on the step before, whole; resumed
    to the end, the losses equal an uninterrupted synchronous run's bit for bit."""
    args = ["--train.max_steps=8", "--train.ckpt_interval=2"]
    ref_out, out, ckpts = tmp_path / "ref", tmp_path / "run", tmp_path / "run" / "checkpoints"
    with _uninterrupted(ref_out, args, tmp_path / "ref.log"):  # synchronous saves
        for phase, step, good in (("writing", 4, "step_000002"), ("shards", 6, "step_000004")):

            def trained(later=step + 2) -> bool:
                """the step loop trains on to the next save"""
                return later in [r["step"] for r in _rows(out)]

            log = tmp_path / f"kill_{phase}.log"
            _kill_during_save(out, [*args, "--train.async_checkpoint=true"], phase, step, log, then=trained)
            latest = CheckpointStore(ckpts).latest()
            assert latest.name == good and (ckpts / "latest").resolve() == latest
            verify(latest)
            assert not (ckpts / f"step_{step:06d}").exists()  # the held step never became a step directory
        res = _cli(out, *args, "--train.async_checkpoint=true")
        assert res.returncode == 0, res.stderr
        assert f"resumed from {ckpts / 'step_000004'}" in res.stdout, res.stdout
    rows, ref_rows = _rows(out), _rows(ref_out)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]  # bit for bit
    assert CheckpointStore(ckpts).latest().name == "step_000008" and not list(ckpts.glob("*.tmp"))
    verify(ckpts / "latest")


# ----------------------------------------------------------------------------- missing latest


def test_missing_or_dangling_latest_resumes_from_the_newest_step(tmp_path):
    out = tmp_path / "run"
    _train(out, "--train.max_steps=4", "--train.ckpt_interval=2", "--train.keep_last=3")
    ckpts = out / "checkpoints"
    before = (out / "metrics.jsonl").read_text()
    (ckpts / "latest").unlink()
    (ckpts / "step_000006.tmp").mkdir()  # a save killed half-way is not a step to resume from
    res = _cli(out, "--train.max_steps=6", "--train.ckpt_interval=2", "--train.keep_last=3")
    assert res.returncode == 0, res.stderr
    assert "is missing or points to a deleted step; resuming from the newest complete checkpoint, step_000004" in (
        res.stdout
    )
    assert (out / "metrics.jsonl").read_text().startswith(before)  # steps 1-4 kept, not rewritten
    assert [r["step"] for r in _rows(out)] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_000002", "step_000004", "step_000006"]
    # `latest` pointing to a deleted directory: the same (library-level, no process needed).
    shutil.rmtree(ckpts / "step_000006")
    assert not (ckpts / "latest").exists() and CheckpointStore(ckpts).latest().name == "step_000004"
    assert load_model_state(ckpts / "latest")[0]["train"]["max_steps"] == 4  # step_000004 was written by then
    # Step directories that cannot be read are never trained over from step 0 (a CheckpointError: one line).
    for p in ckpts.glob("step_*"):
        (p / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="none is complete .*step_000002"):
        _train(out, "--train.max_steps=6")


# ----------------------------------------------------------------------------- corrupt checkpoints


def test_corrupt_or_missing_checkpoint_files_are_refused(tmp_path):
    out = tmp_path / "run"
    _train(out, "--train.max_steps=4", "--train.ckpt_interval=2")
    ckpts = out / "checkpoints"
    step4 = ckpts / "step_000004"
    sums = json.loads((step4 / "meta.json").read_text())["checksums"]
    assert {".metadata", "__0_0.distcp", "train_state.pt", "rng/rank_00000.pt", "config.yaml"} <= set(sums)
    shard = step4 / "__0_0.distcp"
    raw = bytearray(shard.read_bytes())
    for i in range(0, len(raw), len(raw) // 1000):  # 1000 flipped bytes in the tensor data
        raw[i] ^= 0xFF
    shard.write_bytes(bytes(raw))
    corrupt = r"__0_0\.distcp' is corrupt.*older checkpoint '.*step_000002'"
    with pytest.raises(CheckpointError, match=corrupt):
        load_model_state(ckpts / "latest")  # generate, evaluate and convert read through this
    with pytest.raises(CheckpointError, match=corrupt):  # resuming (the CLI prints it as one line)
        _train(out, "--train.max_steps=6")
    # The advice works: with the bad step moved away, the run resumes from the older one.
    shutil.move(step4, tmp_path / "bad_step")
    assert CheckpointStore(ckpts).latest().name == "step_000002"
    # Old checkpoints (no checksums) still load; a missing file is named with what to do.
    meta = json.loads((ckpts / "step_000002" / "meta.json").read_text())
    del meta["checksums"], meta["meta_sha256"]
    (ckpts / "step_000002" / "meta.json").write_text(json.dumps(meta))
    load_model_state(ckpts / "step_000002")
    # A train_state.pt without the data stream's position is refused, not resumed from the first window.
    state_pt = ckpts / "step_000002" / "train_state.pt"
    good = state_pt.read_bytes()
    state = torch.load(state_pt, weights_only=False)
    del state["data"]
    torch.save(state, state_pt)
    _one_error_line(_cli(out, "--train.max_steps=6"), "holds no 'data' state")
    state_pt.write_bytes(good)
    (ckpts / "step_000002" / "train_state.pt").unlink()
    res = _cli(out, "--train.max_steps=6")
    _one_error_line(res, "train_state.pt' is missing", "start a new --out-dir")


def test_damaged_or_missing_meta_json_in_the_newest_step(tmp_path):
    """meta.json itself damaged: a flipped checksum digit or broken JSON is one line naming meta.json (not
    `.metadata`, not a bare 'Expecting ...'); meta.json gone from the step `latest` names: the run resumes
    from the newest complete step and says so (it used to refuse: 'holds no checkpoint')."""
    out = tmp_path / "run"
    _train(out, "--train.max_steps=4", "--train.ckpt_interval=2", "--train.keep_last=3")
    meta = out / "checkpoints" / "step_000004" / "meta.json"
    good = meta.read_text()
    i = good.index('".metadata": "') + len('".metadata": "')
    meta.write_text(good[:i] + ("0" if good[i] != "0" else "1") + good[i + 1 :])
    line = _one_error_line(_cli(out, "--train.max_steps=6"), "step_000004/meta.json' is damaged", "step_000002")
    assert ".metadata" not in line
    meta.write_text(good.replace(",", "", 1))
    _one_error_line(_cli(out, "--train.max_steps=6"), "step_000004/meta.json' is not valid JSON (Expecting")
    meta.unlink()
    res = _cli(out, "--train.max_steps=6", "--train.ckpt_interval=2", "--train.keep_last=3")
    assert res.returncode == 0, res.stderr
    assert (
        "latest' points to step_000004, which has no meta.json (an interrupted or damaged save); "
        "resuming from the newest complete checkpoint, step_000002"
    ) in res.stdout
    assert [r["step"] for r in _rows(out)] == [1, 2, 3, 4, 5, 6]  # steps 3-4 trained again, not doubled


# ----------------------------------------------------------------------------- changed config


def test_changed_config_on_resume_applies_and_is_listed(tmp_path, capsys):
    out, fresh = tmp_path / "run", tmp_path / "fresh"
    _train(out, "--train.max_steps=3")
    capsys.readouterr()
    _train(out, "--train.max_steps=5", "--optim.lr=0.03", "--optim.weight_decay=0.5")
    printed = capsys.readouterr().out
    assert (
        "config differs from the checkpoint: optim.lr 0.003 -> 0.03, optim.weight_decay 0.1 -> 0.5, "
        "train.max_steps 3 -> 5"
    ) in printed
    _train(fresh, "--train.max_steps=5", "--optim.lr=0.03", "--optim.weight_decay=0.5")
    lrs, ref = [r["lr"] for r in _rows(out)], [r["lr"] for r in _rows(fresh)]
    assert lrs[3:] == ref[3:] and lrs[3] > 0.01  # this run's lr and schedule from step 4 on
    with pytest.raises(CheckpointError, match=r"different config: train\.seed 1337 -> 7 .*new --out-dir"):
        _train(out, "--train.max_steps=6", "--train.seed=7")
    with pytest.raises(CheckpointError, match=r"different config: model\.n_embd 128 -> 64 "):
        _train(out, "--train.max_steps=6", "--model.n_embd=64")
    with pytest.raises(
        CheckpointError, match=r"different config: optim\.expert_optimizer muon -> adamw .*optimizer state"
    ):
        _train(out, "--train.max_steps=6", "--optim.expert_optimizer=adamw")  # Adam's moments are not Muon's
    capsys.readouterr()
    _train(
        out,
        "--train.max_steps=6",
        "--optim.lr=0.03",
        "--optim.weight_decay=0.5",
        "--moe.kernels=auto",
        "--model.loss_chunk_tokens=0",
    )  # same math, another path: allowed
    printed = capsys.readouterr().out
    assert "model.loss_chunk_tokens 1024 -> 0" in printed and "model.moe.kernels torch -> auto" in printed


# ----------------------------------------------------------------------------- disk full, bad paths


def _mount_tmpfs(path: Path, *opts: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(opts), "tmpfs", str(path)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.decode().strip() or 'mount failed'}; needs root)")


def test_disk_full_during_a_checkpoint(tmp_path):
    """A real full disk (a 12 MB tmpfs filled up after the first checkpoint): one line, `latest` intact."""
    fs = tmp_path / "fs"
    _mount_tmpfs(fs, "size=12m")
    try:
        out = fs / "run"
        _train(out, "--train.max_steps=2")
        free = shutil.disk_usage(fs).free
        (fs / "ballast").write_bytes(b"\0" * (free - (1 << 20)))  # leave 1 MB: less than a checkpoint
        res = _cli(out, "--train.max_steps=4")
        _one_error_line(res, "checkpoint at step 4 could not be written (No space left on device)", "step_000002")
        ckpts = out / "checkpoints"
        assert not list(ckpts.glob("*.tmp")) and CheckpointStore(ckpts).latest().name == "step_000002"
        (fs / "ballast").unlink()
        _train(out, "--train.max_steps=4")  # the run goes on from the last good step
        assert [r["step"] for r in _rows(out)] == [1, 2, 3, 4]
    finally:
        subprocess.run(["umount", str(fs)], check=False)


def test_unusable_out_dir_is_one_line(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    _one_error_line(_cli(a_file), "is an existing file")
    # Not writable: a path below a regular file cannot be created, even by root (ENOTDIR; portable and
    # real, where chmod would not stop root). The same check reports EROFS or EACCES in their words.
    _one_error_line(_cli(a_file / "out"), "cannot be written (Not a directory)")


def test_convert_to_an_existing_file_is_one_line(tmp_path):
    out = tmp_path / "run"
    _train(out, "--train.max_steps=1", "--train.eval_interval=0")
    target = tmp_path / "taken"
    target.write_text("")
    res = subprocess.run(
        [sys.executable, "-m", "kimi.convert", "--to-hf", str(out), str(target)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    _one_error_line(res, "is an existing file")
