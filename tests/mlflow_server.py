"""A real `mlflow server` on 127.0.0.1 for tests (no mocks: the HTTP client, retries and artifact proxy are real).

    uri, proc = start_mlflow_server(tmp_path)   # blocks until GET /health answers (~10-20 s on 2 cores)
    ...
    stop(proc)                                  # SIGKILL to the whole process group, then wait

or as a pytest fixture (re-exported by tests/conftest.py): `def test_x(mlflow_server): uri, proc = mlflow_server`.

Only the standard library is imported at module level so that conftest.py stays cheap for every test.
The server runs in its own session (`start_new_session=True`) so that `os.killpg` reaches the uvicorn
workers too, and a test can kill it mid-run to simulate a dead tracking server.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

STARTUP_DEADLINE_S = 90.0  # a cold start (imports + sqlite migrations) is ~15 s; generous for a loaded CI box


def free_port() -> int:
    """A port that was free a moment ago (the usual small race is acceptable in tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(
    tmp_path: str | Path, port: int | None = None, deadline_s: float = STARTUP_DEADLINE_S
) -> tuple[str, subprocess.Popen]:
    """Start `mlflow server` with a sqlite store and proxied artifacts under `tmp_path`; return (uri, proc).

    `port`: a fixed port (e.g. one a client already points at, to test reconnection); default a free one.

    mlflow 3.x serves artifacts by default (`--serve-artifacts`): new experiments get the artifact root
    `mlflow-artifacts:/`, which the client uploads through the server into `--artifacts-destination`.
    One worker keeps the 2-core test machine responsive. Raises RuntimeError (with the server's log
    tail) if /health does not answer before the deadline or the process exits.
    """
    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log_path = tmp_path / "mlflow_server.log"
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{(tmp_path / 'server.db').resolve()}",
        "--artifacts-destination", str((tmp_path / "server_artifacts").resolve()),
        "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    # No GenAI job runner (a huey consumer process that imports mlflow again): tests only track runs,
    # and on a 2-core box the extra process roughly doubles the start time.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"  # tests talk to 127.0.0.1 only
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env
        )
    uri = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline_s:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}: {_tail(log_path)}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    proc.startup_s = time.monotonic() - t0  # type: ignore[attr-defined]  # reported by tests
                    return uri, proc
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.25)  # poll interval, not a wait-for-state: the deadline above bounds the loop
    stop(proc)
    raise RuntimeError(f"mlflow server at {uri} did not answer /health within {deadline_s:.0f} s: {_tail(log_path)}")


def stop(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """SIGKILL the server's process group (the server and its workers) and reap it. Idempotent."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # pgid == pid thanks to start_new_session=True
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pass


def ui_chart_sections(names) -> list[tuple[str, list[str]]]:
    """MLflow's UI chart sections for these metric names, in the UI's order (mlflow/server/js, 3.x:
    extractChartSectionName): a metric's section is its name before the last "/"; named sections come
    sorted, then the unprefixed ("Model metrics"), then "system" ("System metrics")."""
    by_section: dict[str, list[str]] = {}
    for n in sorted(names):
        by_section.setdefault(n.rpartition("/")[0], []).append(n.rpartition("/")[2])
    order = sorted(s for s in by_section if s not in ("", "system")) + [s for s in ("", "system") if s in by_section]
    return [(s, by_section[s]) for s in order]


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


@pytest.fixture
def mlflow_server(tmp_path):
    """(uri, proc) of a fresh server for this test; killed afterwards even if the test killed it already."""
    uri, proc = start_mlflow_server(tmp_path / "mlflow_server")
    try:
        yield uri, proc
    finally:
        stop(proc)
