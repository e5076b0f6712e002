"""Tracker: metrics.jsonl, MLflow (local sqlite store and a REAL `mlflow server`), resume, failure policy, plots.

Everything is read back through MlflowClient, the way a person would find it in `mlflow ui`. The server test
kills the server with SIGKILL mid-run and checks that training-side calls neither raise nor block.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kimi.config import Config, LoggingConfig
from kimi.tracking import (
    Tracker,
    flatten_params,
    plot_expert_load,
    plot_loss_curve,
    read_expert_loads,
    resolve_tracking_uri,
)
from kimi.tracking.mlflow_sink import KIND_TAG, TRAINING_KIND, mlflow_key
from tests.mlflow_server import free_port, start_mlflow_server, stop, ui_chart_sections

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FINISH_BOUND_S = 20.0  # finish_timeout (15 s) + plotting


def _cfg(**kw) -> LoggingConfig:
    base = dict(flush_interval=0.1, system_metrics_interval=0.1, experiment="test", run_name="unit")
    return LoggingConfig(**{**base, **kw})


def _loss(step: int) -> float:
    return 5.0 / (1 + 0.1 * step)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _poll(fn, deadline_s: float, what: str):
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline_s:
        out = fn()
        if out:
            return out
        time.sleep(0.1)  # poll interval; the deadline bounds the wait
    raise AssertionError(f"timed out after {deadline_s} s waiting for {what}")


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # tests talk to 127.0.0.1 only


# ----------------------------------------------------------------------------- local sqlite store


def test_sqlite_default_store_round_trip(tmp_path, caplog):
    out = tmp_path / "run"
    params = Config().to_dict()
    params["extra"] = {f"p{i:03d}": i for i in range(40)}  # > 100 params: needs several log_batch calls
    params["extra"]["long"] = "x" * 7000  # over MLflow's 6000-char value limit
    tracker = Tracker(str(out), _cfg(), params=params)
    loads = np.arange(1, 25, dtype=float).reshape(3, 8)
    for step in range(1, 31):
        row = {"step": step, "loss": _loss(step), "lr": 1e-3, "qk_clipped_heads": step % 3}
        if step % 10 == 0:
            row["val_loss"] = _loss(step) + 0.1
            tracker.log_expert_load(step, torch.tensor(loads * step), layer_ids=[1, 2, 3])  # layer 0 dense
        tracker.log(step, row)
    extra = tmp_path / "notes.txt"
    extra.write_text("hello")
    tracker.log_artifact(extra)
    run_id = tracker.run_id  # as the trainer does when it saves the last checkpoint: waits for the first connect
    assert run_id is not None
    t0 = time.monotonic()
    tracker.finish("FINISHED", config_yaml_text=Config().to_yaml())
    finish_s = time.monotonic() - t0
    assert finish_s < FINISH_BOUND_S
    assert _warnings(caplog) == []

    # metrics.jsonl: one row per log() call, in order, exactly what was logged (expert-load summaries
    # go to MLflow only; the full matrices to expert_load.jsonl)
    rows = _rows(out / "metrics.jsonl")
    loss_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in loss_rows] == list(range(1, 31))
    assert loss_rows[0] == {"step": 1, "loss": _loss(1), "lr": 1e-3, "qk_clipped_heads": 1}
    assert len(rows) == 30 and all("system/cpu_percent" not in r for r in rows)
    assert [r["step"] for r in _rows(out / "expert_load.jsonl")] == [10, 20, 30]
    for png in ("loss.png", "expert_load.png"):
        assert (out / "plots" / png).read_bytes()[:8] == PNG_MAGIC

    # MLflow, read back from the default sqlite file under OUT
    client = _client(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("test")
    assert exp.artifact_location == (out.resolve() / "mlartifacts").as_uri()  # not ./mlruns under the CWD
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_id == tracker.run_id and run.info.status == "FINISHED" and run.info.run_name == "unit"
    flat = flatten_params(params)
    assert len(run.data.params) == len(flat) > 100
    assert run.data.params["model.moe.top_k"] == "2" and run.data.params["optim.betas"] == "[0.9, 0.95]"
    assert run.data.params["extra.long"] == "x" * 6000
    assert _history(client, run.info.run_id, "train/loss") == [(s, pytest.approx(_loss(s))) for s in range(1, 31)]
    assert [s for s, _ in _history(client, run.info.run_id, "train/val_loss")] == [10, 20, 30]
    # loads are 1..24 per row of 8: the first row (model layer 1) has max/mean = 8 / 4.5
    assert _history(client, run.info.run_id, "moe_layer1_max_load")[-1] == (30, pytest.approx(8 / 4.5))
    assert "moe_layer0_max_load" not in run.data.metrics
    assert {"system/cpu_percent", "system/rss_gb"} <= set(run.data.metrics)
    assert 0 < run.data.metrics["system/rss_gb"] < 64
    assert not any("expert" in k for k in run.data.metrics if k.startswith("moe"))  # summaries, not L*E series
    # The UI opens the experiment in its training view and shows the training curves first.
    assert exp.tags[KIND_TAG] == TRAINING_KIND
    sections = ui_chart_sections(run.data.metrics)
    assert sections[0] == ("train", ["loss", "lr", "val_loss"]), sections
    assert [s for s, _ in sections] == ["train", "", "system"]  # one MoE section at most, after training
    tags = run.data.tags
    assert tags["host"] == socket.gethostname() and tags["torch_version"] == torch.__version__
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    if head.returncode == 0:
        assert tags["mlflow.source.git.commit"] == head.stdout.strip()
    root = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.jsonl", "expert_load.jsonl", "notes.txt", "plots"} <= root
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {
        "plots/loss.png",
        "plots/expert_load.png",
    }


def test_resume_continues_the_same_run(tmp_path, caplog):
    out = tmp_path / "run"
    params = Config().to_dict()
    first = Tracker(str(out), _cfg(), params=params)
    for step in range(1, 6):
        first.log(step, {"loss": _loss(step)})
    run_id = first.run_id
    first.finish("KILLED")  # preempted; the checkpoint stored run_id

    params["train"]["max_steps"] = 999  # the requeued job runs longer: params are immutable in MLflow
    second = Tracker(str(out), _cfg(), params=params, resume_run_id=run_id)
    assert second.run_id == run_id
    for step in range(6, 11):
        second.log(step, {"loss": _loss(step)})
    second.finish("FINISHED")

    client = _client(f"sqlite:///{out / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [s for s, _ in _history(client, run_id, "train/loss")] == list(range(1, 11))
    assert run.data.params["train.max_steps"] == "20"
    assert run.data.tags["changed_params_on_resume"] == "train.max_steps=999"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert [r["step"] for r in _rows(out / "metrics.jsonl")] == list(range(1, 11))  # appended
    assert _warnings(caplog) == []


def test_existing_experiments_get_the_training_kind_once(tmp_path):
    """An experiment made before (or by hand) is tagged on reuse; a kind chosen in the UI is kept."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = _client(uri)
    old = client.create_experiment("old", artifact_location=(tmp_path / "art").as_uri())
    chosen = client.create_experiment("chosen", tags={KIND_TAG: "genai_development"})
    for name in ("old", "chosen"):
        tracker = Tracker(str(tmp_path / name), _cfg(tracking_uri=uri, experiment=name), params={})
        tracker.log(1, {"loss": 1.0})
        tracker.finish()
    assert client.get_experiment(old).tags[KIND_TAG] == TRAINING_KIND
    assert client.get_experiment(chosen).tags[KIND_TAG] == "genai_development"


def test_nonzero_rank_writes_nothing(tmp_path):
    threads = threading.active_count()
    tracker = Tracker(str(tmp_path / "run"), _cfg(), params=Config().to_dict(), rank=1)
    tracker.log(1, {"loss": 1.0})
    tracker.log_expert_load(1, [[1.0, 2.0]])
    tracker.log_artifact(__file__)
    tracker.finish("FINISHED", config_yaml_text="x: 1")
    assert tracker.run_id is None
    assert not (tmp_path / "run").exists()
    assert threading.active_count() == threads


def test_mlflow_off_still_writes_jsonl_and_plots(tmp_path):
    with Tracker(str(tmp_path), _cfg(mlflow=False), params={}) as tracker:
        tracker.log(1, {"loss": 2.0, "note": "text is kept in the jsonl"})
    assert tracker.run_id is None
    assert _rows(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 2.0, "note": "text is kept in the jsonl"}]
    assert (tmp_path / "plots" / "loss.png").exists() and not (tmp_path / "mlflow.db").exists()


def test_unreachable_server_at_start_warns_once_and_never_blocks(tmp_path, caplog):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    tracker = Tracker(str(tmp_path), _cfg(tracking_uri=uri), params=Config().to_dict(), resume_run_id="abc123")
    t0 = time.monotonic()
    for step in range(1, 201):
        tracker.log(step, {"loss": _loss(step)})
    assert time.monotonic() - t0 < 2.0  # the caller only enqueues (one blocking call to a dead server costs >= 2 s)
    assert tracker.run_id == "abc123"  # MLflow unreachable: keep pointing at the run we were asked to continue
    t0 = time.monotonic()
    tracker.finish("FINISHED")
    assert time.monotonic() - t0 < FINISH_BOUND_S
    warnings = _warnings(caplog)
    assert len(warnings) == 1, warnings
    assert "MLflow logging is off" in warnings[0] and "metrics.jsonl" in warnings[0] and uri in warnings[0]
    assert [r["step"] for r in _rows(tmp_path / "metrics.jsonl")] == list(range(1, 201))


def test_hung_server_finish_is_bounded(tmp_path, caplog):
    """A server that accepts TCP but never answers: every request waits for the HTTP timeout. finish()
    must still return after finish_timeout, with one warning, and the abandoned thread stays quiet."""
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(64)  # the kernel completes handshakes into the backlog; nobody ever reads
        uri = f"http://127.0.0.1:{hole.getsockname()[1]}"
        tracker = Tracker(str(tmp_path), _cfg(tracking_uri=uri, finish_timeout=2.0), params={})
        for step in range(1, 51):
            tracker.log(step, {"loss": _loss(step)})
        t0 = time.monotonic()
        tracker.finish("FINISHED")
        assert time.monotonic() - t0 < 2.0 + 5.0  # finish_timeout + plotting on a busy box
    thread = tracker._sink._thread
    thread.join(timeout=60)  # the socket is closed now: the pending request fails within seconds
    assert not thread.is_alive()
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "did not finish within 2 s" in warnings[0], warnings
    assert [r["step"] for r in _rows(tmp_path / "metrics.jsonl")] == list(range(1, 51))


# ----------------------------------------------------------------------------- a real server


@pytest.mark.slow
def test_real_server_recovers_resumes_and_survives_a_kill(tmp_path, caplog):
    """One real server, three failure stories: not up yet at start (warn once, then reconnect and send
    the backlog), a requeued job resuming the run over HTTP, and the server SIGKILLed mid-run."""
    caplog.set_level(logging.INFO, logger="kimi.tracking")  # the "back on" line is INFO
    port = free_port()
    uri, out = f"http://127.0.0.1:{port}", tmp_path / "run"
    cfg = _cfg(tracking_uri=uri, retry_interval=0.5)
    first = Tracker(str(out), cfg, params=Config().to_dict())
    for step in range(1, 11):
        first.log(step, {"loss": _loss(step)})
    _poll(lambda: _warnings(caplog), 30, "the 'MLflow logging is off' warning")

    uri, proc = start_mlflow_server(tmp_path / "server", port=port)  # the server comes up late
    try:
        client = _client(uri)
        _poll(lambda: any("back on" in r.getMessage() for r in caplog.records), 30, "reconnection")
        run_id = first.run_id
        assert [s for s, _ in _history(client, run_id, "train/loss")] == list(range(1, 11))  # the backlog
        first.finish("KILLED", config_yaml_text="model: {}\n")  # preempted
        assert client.get_run(run_id).info.status == "KILLED"
        assert {a.path for a in client.list_artifacts(run_id, "plots")} == {"plots/loss.png"}
        assert list((tmp_path / "server" / "server_artifacts").rglob("loss.png"))  # through the artifact proxy
        assert len(_warnings(caplog)) == 1
        caplog.clear()

        second = Tracker(str(out), cfg, params=Config().to_dict(), resume_run_id=run_id)
        for step in range(11, 21):
            second.log(step, {"loss": _loss(step)})
        _poll(lambda: len(client.get_metric_history(run_id, "train/loss")) == 20, 30, "steps 11-20 in the resumed run")
        assert second.run_id == run_id and client.get_run(run_id).info.status == "RUNNING"

        os.killpg(proc.pid, 9)  # SIGKILL the server and its workers mid-run
        proc.wait(timeout=10)
        t0 = time.monotonic()
        for step in range(21, 41):
            second.log(step, {"loss": _loss(step)})
        assert time.monotonic() - t0 < 2.0  # enqueue only (one blocking call to a dead server costs >= 2 s)
        t0 = time.monotonic()
        second.finish("FINISHED")
        finish_s = time.monotonic() - t0
        assert finish_s < FINISH_BOUND_S
        warnings = _warnings(caplog)
        assert len(warnings) == 1 and "MLflow logging is off" in warnings[0], warnings
        assert [r["step"] for r in _rows(out / "metrics.jsonl")] == list(range(1, 41))
        print(f"server start {proc.startup_s:.1f} s, finish() with a dead server {finish_s:.1f} s")
    finally:
        stop(proc)


# ----------------------------------------------------------------------------- pure functions


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    assert resolve_tracking_uri(_cfg(), tmp_path) == (f"sqlite:///{tmp_path.resolve()}/mlflow.db", True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(_cfg(), tmp_path) == ("http://env:5000", False)
    assert resolve_tracking_uri(_cfg(tracking_uri="http://cfg:5000"), tmp_path) == ("http://cfg:5000", False)


def test_flatten_params_and_metric_keys():
    assert flatten_params({"a": {"b": {"c": 1}, "d": None}, "e": (1, 2)}) == {
        "a.b.c": "1",
        "a.d": "None",
        "e": "[1, 2]",
    }
    assert mlflow_key("moe/layer0/max_load") == "moe/layer0/max_load"
    assert [mlflow_key(k) for k in ("loss", "val_loss", "lr", "grad_norm", "mfu")] == [
        "train/loss",
        "train/val_loss",
        "train/lr",
        "train/grad_norm",
        "mfu",
    ]
    assert mlflow_key("/bad//name..x?/../y") == "bad/name..x_/y"
    assert mlflow_key("a" * 300) == "a" * 250


def test_plot_loss_curve(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": _loss(s)}) for s in range(1, 81)]
    lines += [json.dumps({"step": s, "val_loss": _loss(s) + 0.2}) for s in (20, 40, 60, 80)]
    lines += [json.dumps({"step": s, "loss": 9.0}) for s in (79, 80)]  # a requeued job re-logged steps 79-80
    path.write_text("\n".join(lines) + '\n{"step": 81, "lo')  # torn last line from a kill
    for log_y in (False, True):
        png = plot_loss_curve(path, tmp_path / f"loss_{log_y}.png", log_y=log_y)
        assert png.read_bytes()[:8] == PNG_MAGIC
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"step": 1, "lr": 0.1}) + "\n")
    assert plot_loss_curve(empty, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_read_expert_loads_after_a_requeue(tmp_path):
    path = tmp_path / "expert_load.jsonl"
    rows = [{"step": s, "layers": [1, 2], "loads": [[s, 1.0], [1.0, s]]} for s in (10, 20, 30)]
    rows += [{"step": s, "layers": [1, 2], "loads": [[s, 2.0], [2.0, s]]} for s in (20, 30, 40)]  # resumed at 10
    path.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"step": 50, "loa')
    steps, loads, layer_ids = read_expert_loads(path)
    assert steps == [10, 20, 30, 40] and layer_ids == [1, 2]
    assert loads[1] == [[20, 2.0], [2.0, 20]]  # the re-run eval replaced the old one


def test_plot_expert_load(tmp_path):
    rng = np.random.default_rng(0)
    two_d = plot_expert_load(rng.gamma(2.0, size=(4, 8)), tmp_path / "a.png")
    many = rng.gamma(2.0, size=(5, 12, 64))
    many[:, 0] = 0  # a dense first layer has no routed load: drawn gray, not as "balanced"
    three_d = plot_expert_load(many.tolist(), tmp_path / "b.png", steps=[100, 200, 300, 400, 500], layer_ids=range(12))
    for png in (two_d, three_d):
        assert png.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="layers x experts"):
        plot_expert_load([1.0, 2.0], tmp_path / "c.png")


def test_where_to_look_opens_the_training_view(tmp_path):
    """The trainer's start line points at MLflow's model-training view (its UI opens GenAI by default)."""
    from kimi.tracking.tracker import where_to_look

    view = "#/?workflowType=machine_learning"
    local = where_to_look(LoggingConfig(), tmp_path)
    assert f"sqlite:///{tmp_path.resolve()}/mlflow.db" in local and view in local
    remote = where_to_look(LoggingConfig(tracking_uri="http://127.0.0.1:5005/"), tmp_path)
    assert remote.startswith(f"mlflow: http://127.0.0.1:5005/{view}")
    assert where_to_look(LoggingConfig(mlflow=False), tmp_path) is None
