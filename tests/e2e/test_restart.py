"""A rank SIGKILLed in a real 2-rank torchrun job with --max-restarts: torchrun restarts the workers, they
resume from checkpoints/latest by themselves, and the job ends as an uninterrupted one would: the same
losses bit for bit, every metrics row exactly once. Killed mid-step, and mid-save (rank 1 held in its
checkpoint write by KIMI_TEST_PAUSE_IN_SAVE while rank 0 waits in the save's collective); FSDP2 and
DeepSpeed. The restarted workers once failed in gloo's connectFullMesh ("Connection refused"): they read
the dead round's addresses from torchrun's shared store (kimi.parallel.mesh.round_store)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.dist_utils import free_port
from tests.e2e.test_hang import signal_rank_1_when

ROOT = Path(__file__).resolve().parents[2]
STEPS = 10
JOB_TIMEOUT = 240  # a restart that cannot find its peers waits parallel.timeout_s (60 s) per round


def _cmd(out: Path, engine: str, restarts: int) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        f"--max-restarts={restarts}", f"--master_port={free_port()}", "-m", "kimi.train",
        "--config", "configs/debug.yaml", f"--train.out_dir={out}", f"--parallel.engine={engine}",
        "--logging.mlflow=false", "--train.eval_interval=0", f"--train.max_steps={STEPS}",
        "--train.ckpt_interval=2", "--parallel.timeout_s=60",
    ]  # fmt: skip


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def _rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


@pytest.fixture(scope="module", params=["fsdp2", "deepspeed"])
def reference(request, tmp_path_factory) -> tuple[str, list[dict]]:
    """(engine, rows) of the same 2-rank job, uninterrupted."""
    out = tmp_path_factory.mktemp(f"ref_{request.param}") / "run"
    cmd = _cmd(out, request.param, restarts=0)
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT)
    assert res.returncode == 0, res.stderr[-3000:]
    return request.param, _rows(out)


def _run_and_kill(tmp_path: Path, engine: str, until, env: dict[str, str]) -> tuple[int, str, str, float]:
    """Start the job with --max-restarts=2, wait for `until(out)`, SIGKILL rank 1's worker process and let
    torchrun recover. Returns (exit code, stdout, stderr, seconds from the kill to the end of the job)."""
    out = tmp_path / "run"
    logs = (tmp_path / "stdout.txt").open("w+"), (tmp_path / "stderr.txt").open("w+")
    cmd = _cmd(out, engine, restarts=2)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=logs[0], stderr=logs[1])
    try:
        signal_rank_1_when(proc, lambda: until(out), signal.SIGKILL, Path(logs[1].name))
        t0 = time.monotonic()
        try:
            rc = proc.wait(timeout=JOB_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job still runs {JOB_TIMEOUT} s after rank 1 was killed")
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            for p in psutil.Process(proc.pid).children(recursive=True):  # workers: sessions of their own
                p.kill()
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return rc, Path(logs[0].name).read_text(), Path(logs[1].name).read_text(), took


def _assert_recovered(rc: int, stdout: str, stderr: str, rows: list[dict], reference: list[dict]) -> None:
    assert rc == 0, stderr[-3000:]
    assert "failed (exitcode: -9) local_rank: 1" in stderr  # it was our SIGKILL that torchrun saw
    assert stdout.count("resumed from") == 1, stdout[-3000:]  # restarted once, and resumed
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # none missing, none twice
    assert [r["loss"] for r in rows] == [r["loss"] for r in reference]  # bit for bit
    assert [r["grad_norm"] for r in rows] == [r["grad_norm"] for r in reference]


@pytest.mark.slow
def test_rank_killed_mid_step_recovers(tmp_path, reference):
    engine, ref_rows = reference
    rc, stdout, stderr, took = _run_and_kill(tmp_path, engine, lambda out: len(_rows(out)) >= 3, _env())
    _assert_recovered(rc, stdout, stderr, _rows(tmp_path / "run"), ref_rows)
    print(f"{engine}: killed mid-step, the job ended {took:.1f} s later")


@pytest.mark.slow
def test_rank_killed_mid_save_recovers(tmp_path, reference):
    """Rank 1 killed while it writes the step-4 checkpoint: `latest` stays step 2, the restart resumes there,
    the half-written step_000004.tmp is not trusted."""
    engine, ref_rows = reference
    env = _env(KIMI_TEST_PAUSE_IN_SAVE="tmp@4:1")
    rc, stdout, stderr, took = _run_and_kill(tmp_path, engine, lambda out: (out / "paused_in_save").exists(), env)
    _assert_recovered(rc, stdout, stderr, _rows(tmp_path / "run"), ref_rows)
    assert "resumed from" in stdout and "step_000002 (step 2," in stdout, stdout[-3000:]
    assert not list((tmp_path / "run" / "checkpoints").glob("*.tmp"))
    print(f"{engine}: killed mid-save, the job ended {took:.1f} s later")
