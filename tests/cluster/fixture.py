"""A real one-node SLURM cluster for tests: the `slurm_cluster` session fixture and a small client.

    from tests.cluster.fixture import slurm_cluster  # noqa: F401  (makes the fixture visible)

    def test_x(slurm_cluster):
        job = slurm_cluster.sbatch("slurm/train_nano.sh", "--train.max_steps=3", env={"CONFIG": ...})
        info = slurm_cluster.wait(job, timeout=120)      # {"JobState": "COMPLETED", "Restarts": "0", ...}

The cluster is started once per session by tests/cluster/start.sh in a temporary folder, on free
loopback ports, and stopped by tests/cluster/stop.sh, which ends its jobs and then the daemons by
the PIDs start.sh recorded. If slurm is not installed the fixture runs tests/cluster/install.sh
(root only). Where that is impossible the tests skip with the reason, unless KIMI_REQUIRE_CLUSTER=1
(CI), where they fail instead.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# Job states after which a job will not run again (a requeued job passes through PENDING instead).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


class ClusterError(RuntimeError):
    """The cluster or a job did not do what was asked, in time."""


class Cluster:
    """Runs slurm commands against the test cluster (its SLURM_CONF) and polls jobs."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.env = {**os.environ, "SLURM_CONF": str(directory / "slurm.conf")}

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise ClusterError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def sbatch(self, script: str, *script_args: str, options: tuple[str, ...] = (), env: dict | None = None) -> int:
        """Submits `script` from the repository root; `env` is added to the job's environment."""
        cmd = ["sbatch", "--parsable", *options, script, *script_args]
        proc = subprocess.run(
            cmd, env={**self.env, **(env or {})}, cwd=REPO, capture_output=True, text=True, timeout=60
        )
        if proc.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (there is no accounting database, so no sacct)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: int, timeout: float, until=None) -> dict[str, str]:
        """Polls until the job reaches a final state (or `until(info)` holds); returns its info."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if until(info) if until else info.get("JobState") in FINAL_STATES:
                return info
            if time.monotonic() > deadline:
                raise ClusterError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f}s")
            time.sleep(0.5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _unavailable(reason: str) -> None:
    if os.environ.get("KIMI_REQUIRE_CLUSTER") == "1":
        pytest.fail(f"SLURM test cluster required (KIMI_REQUIRE_CLUSTER=1) but {reason}")
    pytest.skip(f"no SLURM test cluster: {reason}")


def _ensure_installed() -> None:
    if all(shutil.which(b) for b in ("munged", "slurmctld", "slurmd", "sbatch")):
        return
    if os.geteuid() != 0:
        _unavailable("slurm is not installed and installing it needs root (bash tests/cluster/install.sh)")
    proc = subprocess.run(["bash", str(HERE / "install.sh")], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        _unavailable(f"tests/cluster/install.sh failed: {proc.stderr.strip()[-500:]}")


@contextlib.contextmanager
def running_cluster(directory: Path, nodes: int = 1) -> Iterator[Cluster]:
    """tests/cluster/start.sh in `directory` on free loopback ports (NODES=nodes), stop.sh on exit."""
    if os.geteuid() != 0:
        _unavailable("the test cluster runs its daemons as root")
    _ensure_installed()
    ports = {"SLURMCTLD_PORT": str(_free_port()), "SLURMD_PORT": str(_free_port()), "SLURMD2_PORT": str(_free_port())}
    start = subprocess.run(
        ["bash", str(HERE / "start.sh"), str(directory)],
        env={**os.environ, **ports, "NODES": str(nodes)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        if start.returncode != 0:
            raise ClusterError(f"tests/cluster/start.sh failed: {start.stderr.strip()[-1500:]}")
        yield Cluster(directory)
    finally:
        subprocess.run(["bash", str(HERE / "stop.sh"), str(directory)], capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster
