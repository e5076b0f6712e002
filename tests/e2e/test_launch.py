"""launch/train.sh and launch/multinode.sh on this CPU-only machine: 2 gloo processes of the debug config."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE = "kimi.train"
CONFIG = "configs/debug.yaml"
# 2 processes split the debug global batch of 8; no MLflow store or validation, to keep the runs short.
FAST = ("--train.micro_batch_size=4", "--logging.mlflow=false", "--train.eval_interval=0")


def launcher_env(**env: str) -> dict[str, str]:
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so the CPU fallback runs wherever the test does. With no
    # virtual environment active the launchers take VENV's torchrun: the environment running these tests.
    dropped = ("NPROC", "NGPU", "MASTER_ADDR", "CONFIG", "VIRTUAL_ENV", "TORCHRUN", "PYTHON", "MAX_RESTARTS")
    inherited = {k: v for k, v in os.environ.items() if k not in dropped}
    return {**inherited, "CUDA_VISIBLE_DEVICES": "", "MODULE": MODULE, "VENV": sys.prefix, **env}


def launch(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [f"launch/{script}", *args], cwd=REPO, env=launcher_env(**env), capture_output=True, text=True, timeout=300
    )


def last_row(out: Path) -> dict:
    """The last row of OUT/metrics.jsonl with a training loss."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r][-1]


@pytest.mark.parametrize("script", ["train.sh", "multinode.sh"])
def test_help_lists_the_knobs(script: str) -> None:
    proc = launch(script, "--help")
    assert proc.returncode == 0, proc.stderr
    knobs = (
        "CONFIG",
        "ENGINE",
        "NGPU",
        "NPROC",
        "NNODES",
        "NODE_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "OMP_NUM_THREADS",
    )
    for knob in knobs:
        assert knob in proc.stdout
    assert "torchrun" not in proc.stderr  # --help starts nothing


def test_train_sh_runs_two_cpu_processes(tmp_path: Path) -> None:
    proc = launch("train.sh", "--train.max_steps=2", f"--train.out_dir={tmp_path}", *FAST, CONFIG=CONFIG)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plus = [line for line in proc.stderr.splitlines() if line.startswith("+ ")]
    assert plus == [
        f"+ {sys.prefix}/bin/torchrun --standalone --nproc_per_node=2 --max-restarts=0 -m {MODULE} --config {CONFIG} "
        f"--train.max_steps=2 --train.out_dir={tmp_path} {' '.join(FAST)}"
    ]
    assert "no GPU" in proc.stderr
    assert last_row(tmp_path)["step"] == 2


def test_multinode_sh_one_node_c10d(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = launch(
        "multinode.sh", "--train.max_steps=2", f"--train.out_dir={tmp_path}", *FAST,
        CONFIG=CONFIG, NNODES="1", NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NPROC="2",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"--rdzv_backend=c10d --rdzv_endpoint=127.0.0.1:{port}" in proc.stderr
    assert "the training log appears on the node that c10d makes rank 0" in proc.stderr  # not NODE_RANK=0
    assert last_row(tmp_path)["step"] == 2


def test_bad_knobs_fail_with_one_line() -> None:
    proc = launch("multinode.sh", NNODES="2")
    assert proc.returncode != 0 and "MASTER_ADDR" in proc.stderr.strip().splitlines()[-1]
    proc = launch("train.sh", CONFIG="configs/nope.yaml")
    assert proc.returncode == 2 and "configs/nope.yaml does not exist" in proc.stderr
    proc = launch("train.sh", ENGINE="zero")
    assert proc.returncode == 2 and "ENGINE=zero is not one of fsdp2, deepspeed" in proc.stderr


def test_launchers_find_the_project_venv_without_activation() -> None:
    """`./launch/train.sh` in a fresh shell (no venv active, no torchrun on PATH) uses VENV's torchrun."""
    if not (Path(sys.prefix) / "bin" / "torchrun").exists():
        pytest.skip(f"the tests' Python ({sys.prefix}) is not an environment with bin/torchrun")
    bare = {"PATH": "/usr/bin:/bin", "NPROC": "1"}
    proc = launch("train.sh", "--dry-run", **bare)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"+ {sys.prefix}/bin/torchrun --standalone" in proc.stderr and "parameters: total" in proc.stdout
    proc = launch("train.sh", "--dry-run", VENV="/nonexistent", **bare)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("launch: torchrun not found")


def test_engine_knob_reaches_the_trainer() -> None:
    proc = launch("train.sh", "--dry-run", NPROC="1", ENGINE="deepspeed", PYTHON=sys.executable)
    assert proc.returncode == 0, proc.stderr
    assert "--parallel.engine=deepspeed" in proc.stderr and "deepspeed ZeRO-1 *" in proc.stdout


def torchrun_agent(pid: int) -> int:
    """The torchrun process at or below `pid`: the launcher's shell, or torchrun itself if it was exec'd."""
    while "torchrun" not in Path(f"/proc/{pid}/cmdline").read_bytes().decode():
        (pid,) = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return pid


@pytest.mark.parametrize("target", ["launcher", "agent", "group"])
def test_sigterm_mid_run_exits_3_with_a_checkpoint(tmp_path: Path, target: str) -> None:
    """SIGTERM to launch/train.sh, to its torchrun agent, or to the whole process group (as `kill -TERM -PGID`
    or a container stop does: torchrun gets it twice then, once forwarded) mid-run: the workers finish their
    step, checkpoint and exit 3; torchrun reports 1, the launcher must say 3."""
    args = ("--train.max_steps=500", f"--train.out_dir={tmp_path}", *FAST)
    proc = subprocess.Popen(
        ["launch/train.sh", *args], cwd=REPO, env=launcher_env(CONFIG=CONFIG, NPROC="2", OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        metrics, deadline = tmp_path / "metrics.jsonl", time.monotonic() + 240
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no training step logged in 240 s"
            time.sleep(0.05)
        if target == "launcher":
            os.kill(proc.pid, signal.SIGTERM)
        elif target == "agent":
            os.kill(torchrun_agent(proc.pid), signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher, torchrun and the workers
            proc.wait()
    assert proc.returncode == 3, stderr[-3000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()]
    assert steps == list(range(1, len(steps) + 1)) and steps[-1] < 500
    saved = json.loads((tmp_path / "checkpoints" / "latest" / "meta.json").read_text())["step"]
    assert saved == steps[-1] and f"checkpoint at step {saved} written" in stdout


def test_multinode_sh_two_nodes_on_one_host_match_one_process(tmp_path: Path) -> None:
    """launch/multinode.sh started twice, as node 0 and node 1 of a 2-node job (2 CPU processes each) meeting
    at 127.0.0.1: c10d joins the two torchrun agents into one world of 4, EP=4 puts one expert on each rank,
    so every all-to-all crosses the "nodes", and the losses are one process's (2e-5 relative, fp32 summed
    in another order; tests/e2e/test_train_dist.py). Each agent is a real process: the test waits for both."""
    from kimi.config import load_config
    from kimi.train import train

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    steps, out = 4, tmp_path / "two_nodes"
    args = (f"--train.max_steps={steps}", "--train.micro_batch_size=2", "--logging.mlflow=false",
            "--train.eval_interval=0")  # fmt: skip
    env = dict(CONFIG=CONFIG, NNODES="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NPROC="2",
               OMP_NUM_THREADS="1")  # fmt: skip
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    nodes = []
    for rank, log in enumerate(logs):
        with open(log, "w") as f:  # files, not pipes: neither agent can block on a full pipe we are not reading
            nodes.append(subprocess.Popen(
                ["launch/multinode.sh", *args, "--parallel.ep=4", f"--train.out_dir={out}"], cwd=REPO,
                env=launcher_env(**env, NODE_RANK=str(rank)), stdout=f, stderr=subprocess.STDOUT,
                start_new_session=True,
            ))  # fmt: skip
    try:
        for node in nodes:
            node.wait(timeout=400)
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)  # the launcher, its torchrun agent and workers
                node.wait()
    outputs = [log.read_text() for log in logs]
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-3000:]
        assert "--nnodes=2 --node_rank=" in output and f"--rdzv_endpoint=127.0.0.1:{port}" in output
    meta = json.loads((out / "checkpoints" / "latest" / "meta.json").read_text())
    assert (meta["world_size"], meta["step"]) == (4, steps)

    ref = tmp_path / "one_process"
    train(load_config(REPO / CONFIG, [*args, f"--train.out_dir={ref}", "--train.micro_batch_size=4"]))
    rows, want = ([json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (out, ref))
    assert [r["step"] for r in rows] == [r["step"] for r in want] == list(range(1, steps + 1))
    for a, b in zip(rows, want):
        assert abs(a["loss"] - b["loss"]) <= 2e-5 * abs(b["loss"]), f"step {a['step']}: {a['loss']} vs {b['loss']}"
