"""A 2-process training run logs to a real `mlflow server`; params, metrics and artifacts read back."""

import json
from pathlib import Path

from kimi.config import load_config
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
