"""A hung rank in a real torchrun job (SIGSTOP: alive, so the launcher sees nothing) ends the job in bounded
time, parallel.timeout_s plus the launcher's teardown, with one line from the rank still running; the same
command then resumes from the last checkpoint and finishes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from kimi.trainer.hang import HANG_EXIT_CODE
from tests.dist_utils import free_port

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 15
STEPS = 40  # the stop comes at step ~3: steps left over for the resume to finish


def _cmd(out: Path) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        f"--master_port={free_port()}", "-m", "kimi.train", "--config", "configs/debug.yaml",
        f"--train.out_dir={out}", "--logging.mlflow=false", "--train.eval_interval=0",
        f"--train.max_steps={STEPS}", "--train.ckpt_interval=2", f"--parallel.timeout_s={TIMEOUT_S}",
    ]  # fmt: skip


def _steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def _workers(agent: psutil.Process) -> dict[int, psutil.Process]:
    """torchrun's worker processes by rank (its children; each in a session of its own)."""
    return {int(p.environ()["RANK"]): p for p in agent.children() if "RANK" in p.environ()}


def signal_rank_1_when(proc: subprocess.Popen, ready, sig: int, stderr: Path) -> dict[int, psutil.Process]:
    """Once `ready()` holds (240 s at most) while the torchrun job `proc` runs, send `sig` to rank 1's worker.
    Returns the workers by rank."""
    deadline = time.monotonic() + 240
    while not ready():
        assert proc.poll() is None, "the job ended before the signal: " + stderr.read_text()[-3000:]
        assert time.monotonic() < deadline, "the moment for the signal never came in 240 s"
        time.sleep(0.05)
    workers = _workers(psutil.Process(proc.pid))
    assert sorted(workers) == [0, 1], workers
    workers[1].send_signal(sig)
    return workers


@pytest.mark.slow
def test_a_stopped_rank_ends_the_job_in_bounded_time_and_a_restart_resumes(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = (tmp_path / "stdout.txt").open("w+"), (tmp_path / "stderr.txt").open("w+")
    proc = subprocess.Popen(_cmd(out), cwd=ROOT, env=env, start_new_session=True, stdout=log[0], stderr=log[1])
    workers = {}
    try:
        # rank 1 has logged nothing, but rank 0's rows mean both are stepping
        workers = signal_rank_1_when(proc, lambda: len(_steps(out)) >= 3, signal.SIGSTOP, Path(log[1].name))
        t0 = time.monotonic()
        try:
            rc = proc.wait(timeout=TIMEOUT_S + 60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job still runs {TIMEOUT_S + 60} s after rank 1 stopped (parallel.timeout_s={TIMEOUT_S})")
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for p in workers.values():  # the launcher should have ended them; never leave one behind, or stopped
            if p.is_running():
                p.send_signal(signal.SIGCONT)
                p.kill()
    stderr = Path(log[1].name).read_text()
    assert rc != 0
    lines = [line for line in stderr.splitlines() if "a collective timed out" in line]
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith(f"error: rank 0: a collective timed out after {TIMEOUT_S} s at step "), lines[0]
    assert "restart can resume from checkpoints/latest (step_" in lines[0]
    assert f"exitcode  : {HANG_EXIT_CODE}" in stderr  # torchrun's summary: rank 0 left through our path
    assert took >= TIMEOUT_S - 1, took  # it was the timeout that ended it, not something faster
    print(f"job ended {took:.1f} s after SIGSTOP, torchrun exit {rc}: {lines[0]}")

    before = _steps(out)
    res = subprocess.run(_cmd(out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout, res.stdout[-2000:]
    assert _steps(out) == list(range(1, STEPS + 1)), (before, _steps(out))  # none lost, none twice
