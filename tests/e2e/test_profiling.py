"""train.profile_steps=A:B: a torch.profiler trace per rank covering exactly steps A..B, written where the docs
say, loadable as Chrome-trace JSON, with each op's self time per step beside it (adding up to the steps), and
held by the run's MLflow store (sqlite under OUT, as by default);
train.memory_snapshot on CPU: one line, and the run goes on."""

import json
from pathlib import Path

from kimi.config import load_config
from kimi.train import train

ROOT = Path(__file__).resolve().parents[2]
DEBUG = ROOT / "configs" / "debug.yaml"


def test_profile_steps_write_a_trace_of_those_steps_and_log_it_to_mlflow(tmp_path, capsys):
    from mlflow import MlflowClient

    out = tmp_path / "run"
    overrides = [f"--train.out_dir={out}", "--train.max_steps=4", "--train.profile_steps=2:3",
                 "--train.memory_snapshot=true", "--logging.experiment=prof", "--logging.system_metrics_interval=0"]  # fmt: skip
    train(load_config(DEBUG, overrides))
    printed = capsys.readouterr().out
    assert "train.memory_snapshot: CUDA only, and this run is on cpu; no memory snapshot" in printed

    trace = out / "profile" / "rank0_steps_2-3.json"
    events = json.loads(trace.read_text())["traceEvents"]  # Chrome trace format: what Perfetto opens
    steps = {e["name"]: e for e in events if e.get("name", "").startswith("train_step#")}
    assert sorted(steps) == ["train_step#2", "train_step#3"]  # the window, not steps 1 or 4
    s2, s3 = steps["train_step#2"], steps["train_step#3"]
    assert s2["ts"] + s2["dur"] <= s3["ts"]
    inside = [e for e in events if e.get("ph") == "X" and s2["ts"] <= e["ts"] <= s3["ts"] + s3["dur"]]
    assert any(e["name"].startswith("aten::") for e in inside)  # the steps' own operators, not just markers
    ops = json.loads((out / "profile" / "rank0_ops_steps_2-3.json").read_text())
    assert ops["steps"] == 2 and ops["time"] == "cpu" and ops["ops_s_per_step"]["aten::mm"] > 0
    assert not any(k.startswith("train_step#") for k in ops["ops_s_per_step"])  # one entry: Python between ops
    assert ops["ops_s_per_step"]["(outside any op: Python)"] > 0
    step_s = (s2["dur"] + s3["dur"]) / 2 / 1e6  # the trace's microseconds; per step, not over both
    assert 0.95 < sum(ops["ops_s_per_step"].values()) / step_s < 1.05  # 1.000 measured: self times partition a step
    names = sorted(p.name for p in (out / "profile").iterdir())
    assert names == ["rank0_ops_steps_2-3.json", trace.name]  # no snapshot on CPU

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("prof").experiment_id])
    assert [a.path for a in client.list_artifacts(run.info.run_id, "profile")] == [f"profile/{n}" for n in names]
    stored = Path(client.download_artifacts(run.info.run_id, "profile/rank0_steps_2-3.json", str(tmp_path)))
    assert stored.read_bytes() == trace.read_bytes()
