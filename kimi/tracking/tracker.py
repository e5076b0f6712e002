"""`Tracker`: metrics.jsonl always, MLflow when reachable, plots at the end. Only rank 0 does anything.

Files it writes under OUT (the run's out_dir):
    metrics.jsonl      one JSON object per `log()` call, flushed per line (a kill loses nothing), appended on resume
    expert_load.jsonl  {"step", "loads": [[...] per layer]} per `log_expert_load()` call, appended on resume
    config.yaml        the resolved config handed to `finish()`
    plots/loss.png, plots/expert_load.png   drawn by `finish()` from the two jsonl files (so across requeues)
    mlflow.db          the default MLflow store (`mlflow ui --backend-store-uri sqlite:///OUT/mlflow.db`)
    mlartifacts/       artifacts of that default store

MLflow store: `cfg.tracking_uri` > $MLFLOW_TRACKING_URI > sqlite:///OUT/mlflow.db. All MLflow traffic is
in a background thread (see mlflow_sink.py for the failure policy); system metrics (CPU, RSS, GPU memory)
go to MLflow only, not to metrics.jsonl, which holds exactly what the trainer logged.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from kimi.config import LoggingConfig, flatten_dict
from kimi.tracking.mlflow_sink import MlflowSink
from kimi.tracking.plots import normalise_loads, plot_expert_load, plot_loss_curve, read_expert_loads
from kimi.tracking.system import SystemSampler, current_cuda_device, provenance_tags

log = logging.getLogger("kimi.tracking")
STATUSES = ("FINISHED", "FAILED", "KILLED")
CONNECT_WAIT_S = 60.0  # longest `run_id` waits for the first connection attempt (itself bounded, see run_id)


def resolve_tracking_uri(cfg: LoggingConfig, out_dir: str | Path) -> tuple[str, bool]:
    """(uri, is_default): config > $MLFLOW_TRACKING_URI > sqlite:///<abs out_dir>/mlflow.db."""
    if cfg.tracking_uri:
        return cfg.tracking_uri, False
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], False
    return f"sqlite:///{Path(out_dir).resolve() / 'mlflow.db'}", True


def where_to_look(cfg: LoggingConfig, out_dir: str | Path) -> str | None:
    """One line that says where this run's charts are, in MLflow's model-training view (the UI's GenAI view is
    its default, whatever the experiment's kind tag says); None without MLflow."""
    if not cfg.mlflow:
        return None
    uri, _ = resolve_tracking_uri(cfg, out_dir)
    view = "#/?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return f"mlflow: {uri.rstrip('/')}/{view} (experiment {cfg.experiment})"
    return (
        f"mlflow: mlflow ui --backend-store-uri {uri}, then http://127.0.0.1:5000/{view} (experiment {cfg.experiment})"
    )


def flatten_params(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"model": {"moe": {"top_k": 2}}} -> {"model.moe.top_k": "2"} (MLflow params are flat strings)."""
    return {k: json.dumps(v) if isinstance(v, (list, tuple)) else str(v) for k, v in flatten_dict(tree, prefix).items()}


class Tracker:
    """Experiment tracking for one training job.

    Contract: every method returns quickly and never raises into training (a failing backend logs one
    warning). `log()` costs a JSON line write + an in-memory append; MLflow calls happen in a background
    thread. On rank != 0 every method is a no-op and `run_id` is None. `finish()` returns within about
    `cfg.finish_timeout` seconds even if the tracking server is dead (the run then stays RUNNING in MLflow).
    """

    def __init__(
        self,
        out_dir: str,
        cfg: LoggingConfig,
        params: dict,
        rank: int = 0,
        resume_run_id: str | None = None,
    ) -> None:
        self.cfg, self.rank, self._resume_id = cfg, rank, resume_run_id
        self.enabled = rank == 0
        self.out_dir = Path(out_dir)
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.expert_load_path = self.out_dir / "expert_load.jsonl"
        self._sink: MlflowSink | None = None
        self._sampler: SystemSampler | None = None
        self._finished = False
        self._write_failed = False
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.metrics_path, "a", buffering=1)  # line-buffered: each row reaches the OS at once
        if cfg.mlflow:
            uri, default = resolve_tracking_uri(cfg, self.out_dir)
            if cfg.system_metrics_interval and cfg.system_metrics_interval > 0:
                self._sampler = SystemSampler()
            self._sink = MlflowSink(
                uri,
                cfg.experiment,
                cfg.run_name,
                flatten_params(params or {}),
                resume_run_id,
                # mlflow's own default (./mlruns under the CWD) would scatter artifacts; keep them beside the db
                (self.out_dir.resolve() / "mlartifacts").as_uri() if default else None,
                cfg.flush_interval,
                cfg.system_metrics_interval if self._sampler else math.inf,
                cfg.retry_interval,
                fallback_note=str(self.metrics_path),
                sampler=self._sampler,
                tags_fn=provenance_tags,
                # The rows before this job's first log(): what a resumed MLflow run should hold.
                reconcile=_rows_reader(self.metrics_path, self.metrics_path.stat().st_size) if resume_run_id else None,
            )

    # ------------------------------------------------------------------ per step

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Append {"step": step, **metrics} to metrics.jsonl now; queue the numeric values for MLflow.

        Pass Python numbers (a tensor is read with `.item()`, which syncs a CUDA stream). Non-numeric values
        (strings) go to the jsonl only. NaN/inf are written as NaN/Infinity, which Python's json reads back.
        """
        if not self.enabled or self._finished:
            return
        row: dict[str, Any] = {"step": int(step)}
        for k, v in metrics.items():
            if k != "step":
                row[k] = v.item() if hasattr(v, "item") else v  # 0-d tensors / numpy scalars
        numeric = numeric_values(row)
        self._write(self._jsonl, row)
        if self._sink is not None:
            if self._sampler is not None and self._sampler.cuda_device is None:
                self._sampler.cuda_device = current_cuda_device()
            self._sink.add_metrics(int(step), numeric, int(time.time() * 1000))

    def log_expert_load(self, step: int, loads_LE: Any, layer_ids: list[int] | None = None) -> None:
        """Record per-expert token counts (or fractions) of each MoE layer (L x E) at an eval.

        The full matrix goes to expert_load.jsonl (heatmap + MLflow artifact at finish); only a compact
        summary becomes metrics (2 + L series instead of L * E): `moe_layer{i}_max_load` (max / mean load
        of that layer, 1 = perfectly balanced), `moe_max_load` and `moe_min_load` over all layers.
        `layer_ids` names the rows (model layer indices, e.g. [1, 2] when layer 0 is dense); default 0..L-1.
        """
        if not self.enabled or self._finished:
            return
        try:
            if hasattr(loads_LE, "detach"):
                loads_LE = loads_LE.detach().float().cpu().numpy()
            arr_LE = np.asarray(loads_LE, dtype=float)
            if arr_LE.ndim != 2:
                raise ValueError(f"expected (layers x experts), got shape {arr_LE.shape}")
            layer_ids = [int(i) for i in layer_ids] if layer_ids is not None else list(range(arr_LE.shape[0]))
            if len(layer_ids) != arr_LE.shape[0]:
                raise ValueError(f"{len(layer_ids)} layer_ids for {arr_LE.shape[0]} rows of loads")
        except (TypeError, ValueError) as e:
            log.warning("log_expert_load(step=%s) ignored: %s", step, e)
            return
        with open(self.expert_load_path, "a") as f:
            self._write(f, {"step": int(step), "layers": layer_ids, "loads": arr_LE.tolist()})
        norm_LE = normalise_loads(arr_LE)
        # Flat names: a "moe/layer1/" prefix would make one chart section per layer, and named sections
        # come before the training curves in MLflow's UI (see TRAIN_SECTION in mlflow_sink.py).
        summary = {
            f"moe_layer{i}_max_load": float(np.nanmax(r)) for i, r in zip(layer_ids, norm_LE) if np.isfinite(r).any()
        }
        if np.isfinite(norm_LE).any():
            summary["moe_max_load"], summary["moe_min_load"] = float(np.nanmax(norm_LE)), float(np.nanmin(norm_LE))
        # MLflow only: metrics.jsonl keeps one row per training step (the matrix is in expert_load.jsonl).
        if self._sink is not None:
            self._sink.add_metrics(int(step), summary, int(time.time() * 1000))

    # ------------------------------------------------------------------ files

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file to the run (in the background: the file must stay in place until `finish()`)."""
        if self.enabled and self._sink is not None:
            self._sink.add_artifact(str(path), artifact_path)

    def log_figure(self, fig: Any, name: str) -> Path | None:
        """Save a matplotlib figure to OUT/plots/<name> (.png if no suffix) and upload it under plots/."""
        if not self.enabled:
            return None
        path = self.out_dir / "plots" / (name if Path(name).suffix else f"{name}.png")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=110)
        except Exception as e:
            log.warning("log_figure(%s) failed: %s", name, e)
            return None
        self.log_artifact(path, "plots")
        return path

    @property
    def run_id(self) -> str | None:
        """The MLflow run this job logs to (store it in checkpoints; pass it back as `resume_run_id`).

        The first read waits for the first connection attempt, which is started by the constructor and
        takes a few seconds (importing mlflow; creating a fresh sqlite schema is ~5-15 s on a busy 2-core
        box; a dead server fails within ~3 s, a black-holed one within ~18 s); bounded by CONNECT_WAIT_S.
        If MLflow cannot be reached it returns `resume_run_id`, so a requeued job keeps the same run.
        """
        if self._sink is None:
            return None
        return self._sink.wait_run_id(CONNECT_WAIT_S) or self._resume_id

    # ------------------------------------------------------------------ end

    def finish(self, status: str = "FINISHED", config_yaml_text: str | None = None) -> None:
        """Draw the plots, upload config/plots/jsonl files, flush metrics, end the MLflow run with `status`.

        Bounded by `cfg.finish_timeout` s plus the plotting time (~1 s); idempotent; never raises. A run
        that finishes seconds after it started should read `run_id` first (as the trainer does when it
        saves its last checkpoint), else the first connection may still be under way when time runs out.
        """
        if not self.enabled or self._finished:
            return
        self._finished = True
        status = str(status).upper()
        if status not in STATUSES:
            log.warning("finish(status=%r): not one of %s; using FAILED", status, ", ".join(STATUSES))
            status = "FAILED"
        try:
            self._jsonl.close()
        except OSError:
            pass
        files: list[tuple[Path, str | None]] = []
        try:
            if config_yaml_text is not None:
                (self.out_dir / "config.yaml").write_text(config_yaml_text)
                files.append((self.out_dir / "config.yaml", None))
            files.append((self.metrics_path, None))
            loss_png = plot_loss_curve(self.metrics_path, self.out_dir / "plots" / "loss.png", self.cfg.plot_log_y)
            if loss_png:
                files.append((loss_png, "plots"))
            if self.expert_load_path.exists():
                files.append((self.expert_load_path, None))
                load_png = self._plot_expert_load()
                if load_png:
                    files.append((load_png, "plots"))
        except Exception as e:  # a plotting bug must not turn a finished run into a crash
            log.warning("tracker: writing end-of-run files failed: %s", e)
        if self._sink is None:
            return
        for path, art_dir in files:
            self._sink.add_artifact(str(path), art_dir)
        self._sink.close(status, self.cfg.finish_timeout)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.finish("FINISHED")
        else:
            self.finish("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
        return False

    def _plot_expert_load(self) -> Path | None:
        steps, loads, layer_ids = read_expert_loads(self.expert_load_path)
        if not loads:
            return None
        out = self.out_dir / "plots" / "expert_load.png"
        return plot_expert_load(loads, out, steps=steps, layer_ids=layer_ids)

    def _write(self, f, row: dict[str, Any]) -> None:
        try:
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()
        except (OSError, ValueError) as e:  # disk full / closed file: say it once, keep training
            if not self._write_failed:
                self._write_failed = True
                log.warning("tracker: cannot write %s (%s); metrics are only going to MLflow now", f.name, e)


def numeric_values(row: dict[str, Any]) -> dict[str, float]:
    """The values of a metrics row that go to MLflow: numbers (bool as 0/1), not the step, not strings."""
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))}


def _rows_reader(path: Path, nbytes: int):
    """A function that reads the first `nbytes` of metrics.jsonl (the rows written before this job began,
    already cut to its resume step) as (step, timestamp_ms, MLflow values) for the sink's reconcile."""

    def read() -> list[tuple[int, int, dict[str, float]]]:
        with open(path, "rb") as f:
            lines = f.read(nbytes).decode(errors="replace").splitlines()
        ts, rows = int(time.time() * 1000), []
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append((row["step"], ts, numeric_values(row)))
        return rows

    return read


def truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop rows a killed run logged after its last checkpoint, so steps are not doubled."""
    if not path.exists():
        return

    def step_of(line: str) -> float:
        try:
            return json.loads(line).get("step", 0)
        except ValueError:  # a line torn by the kill that interrupted the run
            return float("inf")

    lines = path.read_text().splitlines()
    keep = [line for line in lines if line.strip() and step_of(line) <= last_step]
    if len(keep) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)
