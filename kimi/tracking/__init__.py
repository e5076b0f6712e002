"""Experiment tracking: metrics.jsonl always, MLflow when reachable, system metrics, plots.

tracker = Tracker(out_dir, cfg.logging, params=cfg.to_dict(), rank=rank, resume_run_id=ckpt_run_id)
tracker.log(step, {"loss": 3.2, "lr": 1e-3})          # per step: a JSON line + an in-memory append
tracker.log_expert_load(step, loads_LE)                # at eval: (layers x experts) token counts
tracker.finish("FINISHED", config_yaml_text=cfg.to_yaml())
tracker.run_id                                         # store in checkpoints; pass back on requeue

tracker.py      the Tracker (files under OUT, rank gating, finish)
mlflow_sink.py  the background thread that talks to MLflow and its failure policy
system.py       CPU / RSS / GPU-memory samples and provenance tags (git, host, versions)
plots.py        plot_loss_curve, plot_expert_load
"""

from kimi.tracking.plots import plot_expert_load, plot_loss_curve, read_expert_loads, read_series
from kimi.tracking.tracker import Tracker, flatten_params, resolve_tracking_uri

__all__ = [
    "Tracker",
    "flatten_params",
    "plot_expert_load",
    "plot_loss_curve",
    "read_expert_loads",
    "read_series",
    "resolve_tracking_uri",
]
