"""slurm/train_nano.sh across two SLURM nodes emulated on this one host (tests/cluster/start.sh NODES=2: a
second slurmd, `slurmd -N localhost`, beside the one named after the host), CPU only.

`sbatch --nodes=2` runs one torchrun agent per node under srun; they meet at the head node's name through
c10d, 2 gloo processes each, EP=4 over the 4 ranks, so every all-to-all crosses the two "nodes". The losses
of 4 steps are one process's within 2e-5 relative (fp32 summed in another order, as
tests/e2e/test_train_dist.py). Measured: 1.8e-7, bit for bit what launch/multinode.sh's two nodes give.
Its own cluster (module fixture), so the one-node cluster of tests/cluster/test_slurm.py stays as it is.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cluster.fixture import Cluster, running_cluster

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "configs/debug.yaml"
STEPS = 4
ARGS = (f"--train.max_steps={STEPS}", "--logging.mlflow=false", "--train.eval_interval=0")


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory):
    with running_cluster(tmp_path_factory.mktemp("slurm2"), nodes=2) as cluster:
        yield cluster


def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return [r["loss"] for r in rows]


@pytest.mark.slow
def test_two_node_job_trains_ep_across_the_nodes_like_one_process(two_nodes: Cluster, tmp_path: Path) -> None:
    from kimi.config import load_config
    from kimi.train import train

    out = tmp_path / "job"
    env = {"CONFIG": CONFIG, "OUT_DIR": str(out), "NPROC": "2", "MODULE": "kimi.train",
           "EXTRA": f"--parallel.ep=4 --train.micro_batch_size=2 {' '.join(ARGS)}"}  # fmt: skip
    options = ("--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1", f"--output={tmp_path}/slurm-%j.out")
    job = two_nodes.sbatch("slurm/train_nano.sh", options=options, env=env)
    info = two_nodes.wait(job, timeout=300)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert info["NumNodes"] == "2" and "on 2 node(s)" in log, info
    meta = json.loads((out / "checkpoints" / "latest" / "meta.json").read_text())
    assert meta["world_size"] == 4

    ref = tmp_path / "one_process"
    train(load_config(ROOT / CONFIG, [*ARGS, f"--train.out_dir={ref}"]))
    for step, (a, b) in enumerate(zip(_losses(out), _losses(ref)), 1):
        assert abs(a - b) <= 2e-5 * abs(b), f"step {step}: two nodes {a} vs one process {b}"
