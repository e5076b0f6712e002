"""slurm/train_nano.sh on a real one-node SLURM cluster (tests/cluster/), CPU only.

Five jobs share the 2-CPU node, each as 2 gloo processes of the debug config with --parallel.ep=2:
(a) uninterrupted: completes with a checkpoint and an MLflow run; (b) sent USR1 mid-run as
`--signal=B:USR1@120` would (to the batch shell only): checkpoints, requeues itself, resumes and
reproduces (a)'s loss at every step; (c) one rank SIGKILLed mid-run (a crash, no save): requeued,
resumes from the last checkpoint and reproduces (a)'s losses too; (d) a misspelt config key: fails with
one clear line and is not requeued; (e) a plain scancel: stays cancelled. The `#SBATCH --gpus-per-node=1`
request is overridden on the command line, as on any node without GPUs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest

from tests.cluster.fixture import Cluster, slurm_cluster  # noqa: F401  (the session fixture)

pytestmark = pytest.mark.cluster

MODULE = "kimi.train"
CONFIG = "configs/debug.yaml"
STEPS = 10
# 2 processes split the debug global batch of 8 (4 each); experts split over both (ep=2).
EXTRA = "--parallel.ep=2 --train.micro_batch_size=4"
CPU_NODE = ("--gpus-per-node=0", "--cpus-per-task=1")
JOB_TIMEOUT = 240


def metrics(out: Path) -> list[dict]:
    """The rows of OUT/metrics.jsonl that carry a training loss (others hold e.g. expert loads)."""
    path = out / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return [r for r in rows if "loss" in r]


def log_of(tmp: Path, job: int) -> str:
    return (tmp / f"slurm-{job}.out").read_text()


def wait_for_steps(cluster: Cluster, job: int, out: Path, tmp: Path, steps: int = 2) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT
    while len(metrics(out)) < steps:
        assert cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), log_of(tmp, job)
        assert time.monotonic() < deadline, f"job {job} wrote no metrics in {JOB_TIMEOUT}s"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def jobs(slurm_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> dict:  # noqa: F811
    """Submits the jobs at once (so they overlap) and returns {name: (job id, out dir)}. The tests
    that signal or kill a job come first in this file (through `interrupted`): they must catch their job
    while it runs."""
    tmp = tmp_path_factory.mktemp("jobs")
    submitted = {"tmp": tmp}
    # Submission order decides who gets the node's 2 CPUs first; "cancelled" runs until it is cancelled.
    args = {
        "bad": (f"--train.max_steps={STEPS}", "--model.n_layerz=3"),
        "signalled": (f"--train.max_steps={STEPS}",),
        "crashed": (f"--train.max_steps={STEPS}", "--train.ckpt_interval=2"),
        "plain": (f"--train.max_steps={STEPS}",),
        "cancelled": ("--train.max_steps=100000",),
    }
    for name, script_args in args.items():
        out = tmp / name
        env = {"CONFIG": CONFIG, "OUT_DIR": str(out), "NPROC": "2", "EXTRA": EXTRA, "MODULE": MODULE}
        options = (*CPU_NODE, f"--output={tmp}/slurm-%j.out", f"--job-name={name}")
        submitted[name] = (slurm_cluster.sbatch("slurm/train_nano.sh", *script_args, options=options, env=env), out)
    yield submitted
    for name in args:
        slurm_cluster.run("scancel", str(submitted[name][0]), check=False)


@pytest.fixture(scope="module")
def interrupted(slurm_cluster: Cluster, jobs: dict) -> None:  # noqa: F811
    """Sends both mid-run faults, each once its job has logged steps: USR1 to "signalled" (what
    `#SBATCH --signal=B:USR1@120` delivers) and SIGKILL to rank 1 of "crashed". One loop for both, as the
    two jobs run at the same time and either could finish while a test waited for the other."""
    pending = {"signalled": 2, "crashed": 3}  # job -> rows to wait for
    deadline = time.monotonic() + JOB_TIMEOUT
    while pending:
        for name, rows in list(pending.items()):
            job, out = jobs[name]
            assert slurm_cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), log_of(jobs["tmp"], job)
            if len(metrics(out)) < rows:
                continue
            if name == "signalled":
                slurm_cluster.run("scancel", "--signal=USR1", "--batch", str(job))
            else:
                _worker_of(job, 1).kill()
            del pending[name]
        assert time.monotonic() < deadline, f"{sorted(pending)} wrote no metrics in {JOB_TIMEOUT}s"
        time.sleep(0.2)


def test_signalled_job_requeues_and_resumes_to_the_same_loss(
    slurm_cluster: Cluster,  # noqa: F811
    jobs: dict,
    interrupted: None,
) -> None:
    job, out = jobs["signalled"]
    info = slurm_cluster.wait(job, timeout=JOB_TIMEOUT)
    log = log_of(jobs["tmp"], job)
    assert info["JobState"] == "COMPLETED", log
    assert int(info["Restarts"]) >= 1, log
    assert "slurm: got SIGUSR1" in log and f"requeueing job {job}" in log and "(restart 1)" in log
    assert "resumed from" in log.split("(restart 1)")[1]  # the trainer's own word that it resumed
    resumed = metrics(out)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))  # no step lost or repeated

    plain_job, plain_out = jobs["plain"]
    assert slurm_cluster.wait(plain_job, timeout=JOB_TIMEOUT)["JobState"] == "COMPLETED"
    # Same seed, same world size: a bit-exact resume reproduces every step's loss, not just the last.
    plain = metrics(plain_out)
    assert [r["step"] for r in plain] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in plain]


def _worker_of(job: int, rank: int) -> psutil.Process:
    """The trainer process of global rank `rank` in slurm job `job` (torchrun's worker, below slurmstepd)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            env = p.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if env.get("SLURM_JOB_ID") == str(job) and env.get("RANK") == str(rank) and MODULE in " ".join(p.cmdline()):
            found.append(p)
    assert len(found) == 1, found
    return found[0]


def test_crashed_job_requeues_and_resumes_to_the_same_loss(
    slurm_cluster: Cluster,  # noqa: F811
    jobs: dict,
    interrupted: None,
) -> None:
    """One rank SIGKILLed mid-run (no handler runs, nothing is saved): torchrun (MAX_RESTARTS=0) fails, the
    batch script requeues the job (MAX_REQUEUES), which resumes from checkpoints/latest; its losses equal
    the uninterrupted job's at every step, and metrics.jsonl has each step once."""
    job, out = jobs["crashed"]
    info = slurm_cluster.wait(job, timeout=JOB_TIMEOUT)
    log = log_of(jobs["tmp"], job)
    assert info["JobState"] == "COMPLETED", log
    assert int(info["Restarts"]) == 1, log
    assert f"requeueing job {job} (crash requeue 1 of MAX_REQUEUES=2)" in log and "(restart 1)" in log, log
    assert "resumed from" in log.split("(restart 1)")[1]
    crashed = metrics(out)
    assert [r["step"] for r in crashed] == list(range(1, STEPS + 1))  # none lost, none twice

    plain_job, plain_out = jobs["plain"]
    assert slurm_cluster.wait(plain_job, timeout=JOB_TIMEOUT)["JobState"] == "COMPLETED"
    assert [r["loss"] for r in crashed] == [r["loss"] for r in metrics(plain_out)]


def test_cancelled_job_stays_cancelled(slurm_cluster: Cluster, jobs: dict) -> None:  # noqa: F811
    """A plain scancel sends TERM to the batch shell as well: the trainer saves, nothing is requeued, and the
    batch shell exits 3 (the trainer's code, which torchrun reports as 1) for a requeue policy outside."""
    job, out = jobs["cancelled"]
    wait_for_steps(slurm_cluster, job, out, jobs["tmp"])
    slurm_cluster.run("scancel", str(job))
    deadline = time.monotonic() + JOB_TIMEOUT
    while "slurm: done" not in log_of(jobs["tmp"], job):  # the batch shell's last word
        assert time.monotonic() < deadline, log_of(jobs["tmp"], job)
        time.sleep(0.2)
    info = slurm_cluster.wait(job, timeout=JOB_TIMEOUT)
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), log_of(jobs["tmp"], job)
    assert "slurm: done, exit code 3" in log_of(jobs["tmp"], job)


def test_job_completes_with_checkpoint_and_mlflow_run(slurm_cluster: Cluster, jobs: dict) -> None:  # noqa: F811
    job, out = jobs["plain"]
    info = slurm_cluster.wait(job, timeout=JOB_TIMEOUT)
    log = log_of(jobs["tmp"], job)
    assert info["JobState"] == "COMPLETED", log
    assert "+ srun " in log and f"--rdzv_id={job} --rdzv_backend=c10d" in log
    assert (out / "checkpoints" / "latest").exists()
    rows = metrics(out)
    assert rows and rows[-1]["step"] == STEPS

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["train/loss"] == pytest.approx(rows[-1]["loss"], rel=1e-6)


def test_bad_config_fails_with_one_clear_line(slurm_cluster: Cluster, jobs: dict) -> None:  # noqa: F811
    job, _ = jobs["bad"]
    info = slurm_cluster.wait(job, timeout=JOB_TIMEOUT)
    log = log_of(jobs["tmp"], job)
    assert info["JobState"] == "FAILED", log
    errors = [line for line in log.splitlines() if line.startswith("error:") and "n_layerz" in line]
    assert errors and "n_layer" in errors[0].replace("n_layerz", ""), log
    assert "requeueing" not in log and "not requeued: the trainer stopped on an error a restart would repeat" in log
