"""A 2-process training run logs to a real `mlflow server`; params, metrics and artifacts read back. A run
SIGKILLed and resumed leaves the MLflow run holding every row of metrics.jsonl exactly once."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kimi.config import load_config
from kimi.tracking.mlflow_sink import mlflow_key
from kimi.train import train
from tests.dist_utils import run_distributed
from tests.mlflow_server import ui_chart_sections

ROOT = Path(__file__).resolve().parents[2]


def _rank(rank, world, out, uri):
    cfg = load_config(ROOT / "configs" / "debug.yaml", [
        f"--train.out_dir={out}", f"--logging.tracking_uri={uri}", "--train.max_steps=6", "--train.eval_interval=3",
        "--parallel.ep=2", "--logging.run_name=server-test",
    ])  # fmt: skip
    return train(cfg)["loss"]


def test_two_process_training_against_a_real_server(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    uri, _proc = mlflow_server
    out = tmp_path / "run"
    run_distributed(_rank, 2, args=(str(out), uri), timeout=600)

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("nanokimi")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1  # rank 1 logs nothing
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "server-test"
    assert run.data.params["parallel.ep"] == "2" and run.data.params["model.n_layer"] == "2"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(r["step"], r["loss"]) for r in rows]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/val_loss")] == [3, 6]
    # The UI opens this experiment in its training view, the trainer's curves in the first chart section.
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    first, names = ui_chart_sections(run.data.metrics)[0]
    assert first == "train" and {"loss", "val_loss", "lr", "grad_norm"} <= set(names), names
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    names |= {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"config.yaml", "metrics.jsonl", "plots/loss.png", "plots/expert_load.png"} <= names, names
    # The run id went into the checkpoint, so a requeued job continues this run.
    meta = json.loads((out / "checkpoints" / "latest" / "meta.json").read_text())
    assert meta["mlflow_run_id"] == run.info.run_id


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _the_run(client):
    exp = client.get_experiment_by_name("nanokimi")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return runs[0] if len(runs) == 1 else None


@pytest.mark.parametrize("case", ["unsent", "sent_past_checkpoint"])
def test_sigkill_then_resume_reconciles_mlflow_with_metrics_jsonl(mlflow_server, tmp_path, case):
    """SIGKILL a real `python -m kimi.train` logging to a real server, resume it: the MLflow run ends up
    with every row of metrics.jsonl exactly once. `unsent`: points were still queued (flush every 1000 s)
    when the kill came, so steps up to the checkpoint are missing from MLflow. `sent_past_checkpoint`:
    MLflow already had steps after the checkpoint, which the resumed job logs again; MLflow cannot delete
    a point, so for those steps it keeps the first job's values (equal for the loss, which resumes bit-exactly;
    not for timings)."""
    from mlflow.tracking import MlflowClient

    uri, _proc = mlflow_server
    client = MlflowClient(tracking_uri=uri)
    out = tmp_path / "run"
    flush = "1000" if case == "unsent" else "0.1"
    cmd = [sys.executable, "-m", "kimi.train", "--config", "configs/debug.yaml", f"--train.out_dir={out}",
           f"--logging.tracking_uri={uri}", f"--logging.flush_interval={flush}", "--train.max_steps=14",
           "--train.ckpt_interval=5", "--train.eval_interval=0"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    latest = out / "checkpoints" / "latest" / "meta.json"

    def killable() -> bool:  # a checkpoint at 5, and (sent_past_checkpoint) MLflow holding a later step
        if not latest.exists() or json.loads(latest.read_text())["step"] != 5:
            return False
        if case == "unsent":
            return True
        run = _the_run(client)
        return run is not None and any(s > 5 for s, _ in _history(client, run.info.run_id, "train/loss"))

    try:
        deadline = time.monotonic() + 300
        while not killable():
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "no checkpoint at step 5 in 300 s"
            time.sleep(0.05)
        proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    run_id = _the_run(client).info.run_id
    sent = _history(client, run_id, "train/loss")
    saved = json.loads(latest.read_text())["step"]
    redone = {s for s, _ in sent if s > saved}
    if case == "unsent":
        assert [s for s, _ in sent if s <= saved] != list(range(1, saved + 1)), sent  # rows MLflow lacks
    else:
        assert redone, sent  # the resume logs these steps again

    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    run = _the_run(client)
    assert run is not None and run.info.run_id == run_id and run.info.status == "FINISHED"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 15))
    keys = {k for r in rows for k, v in r.items() if k != "step" and isinstance(v, (int, float))}
    assert "loss" in keys and "grad_norm" in keys
    for k in sorted(keys):
        want = [(r["step"], float(r[k])) for r in rows if isinstance(r.get(k), (int, float))]
        got = _history(client, run_id, mlflow_key(k))
        assert [s for s, _ in got] == [s for s, _ in want], k  # every row exactly once
        exact = k in ("loss", "grad_norm", "lr")  # bit-exact after a resume, unlike the timings
        assert [p for p in got if exact or p[0] not in redone] == [p for p in want if exact or p[0] not in redone], k
