"""Plots that `Tracker.finish` attaches to the run: the loss curve and the MoE expert-load heatmap.

Both are plain functions over files/arrays, usable after the fact:
    python -c "from kimi.tracking import plot_loss_curve; plot_loss_curve('out/x/metrics.jsonl', 'loss.png')"

They build `matplotlib.figure.Figure` objects directly (rendered by Agg) instead of going through
pyplot, so they never switch the process-wide backend, keep no global figure list, and work headless.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, MaxNLocator

TRAIN_LOSS_KEYS = ("loss", "train/loss", "train_loss")  # the first one present in metrics.jsonl is plotted
VAL_LOSS_KEYS = ("val_loss", "val/loss", "eval/loss", "eval_loss")


def read_series(metrics_jsonl_path: str | Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl -> {key: {step: value}}. Later rows win for a repeated step (a requeued job re-logs
    the steps after its last checkpoint); a torn last line (the process was killed mid-write) is skipped."""
    series: dict[str, dict[int, float]] = {}
    with open(metrics_jsonl_path) as f:
        for line in f:
            try:
                row = json.loads(line)
                step = int(row["step"])
            except (ValueError, KeyError, TypeError):
                continue
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    series.setdefault(k, {})[step] = float(v)
    return series


def read_expert_loads(path: str | Path) -> tuple[list[int], list, list[int] | None]:
    """expert_load.jsonl -> (steps, loads per step (layers x experts), layer ids of the rows or None).

    A requeued job re-runs the evals after its last checkpoint: a step <= the previous one drops the
    older rows from that step on. If the shape changed (another config in the same out_dir), only the
    rows with the latest shape are kept. Torn or foreign lines are skipped.
    """
    rows: list[dict] = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
                step, shape = int(row["step"]), np.shape(row["loads"])
            except (ValueError, KeyError, TypeError):
                continue
            if len(shape) != 2:
                continue
            rows = [r for r in rows if r["step"] < step]
            rows.append({**row, "step": step, "shape": shape})
    if not rows:
        return [], [], None
    rows = [r for r in rows if r["shape"] == rows[-1]["shape"]]
    return [r["step"] for r in rows], [r["loads"] for r in rows], rows[-1].get("layers")


def plot_loss_curve(metrics_jsonl_path: str | Path, out_png: str | Path, log_y: bool = False) -> Path | None:
    """Train loss (raw + smoothed) and val loss against step; returns `out_png`, or None if no loss was logged."""
    series = read_series(metrics_jsonl_path)
    train = next((series[k] for k in TRAIN_LOSS_KEYS if k in series), None)
    val = next((series[k] for k in VAL_LOSS_KEYS if k in series), None)
    if not train and not val:
        return None
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    finite: list[float] = []
    if train:
        x, y = _sorted_xy(train)
        finite += [v for v in y if math.isfinite(v)]
        if len(x) > 50:  # raw curve faint, a smoothed one on top so the trend is readable through batch noise
            w = max(3, len(x) // 40) | 1
            ax.plot(x, y, color="tab:blue", alpha=0.25, lw=0.8, label="train")
            ax.plot(x, _centered_mean(y, w), color="tab:blue", lw=1.8, label=f"train (mean of {w} steps)")
        else:
            ax.plot(x, y, color="tab:blue", lw=1.5, marker="." if len(x) < 30 else None, label="train")
    if val:
        x, y = _sorted_xy(val)
        finite += [v for v in y if math.isfinite(v)]
        ax.plot(x, y, color="tab:orange", lw=1.8, marker="o", ms=4, label="val")
    if log_y and finite and min(finite) > 0:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))  # 3, 4, 6 rather than 3x10^0
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    elif len(finite) > 20:  # the first steps (loss ~ ln(vocab)) would otherwise flatten the rest of the curve
        lo, hi = min(finite), float(np.percentile(finite, 98))
        if hi - lo > 1e-9 * max(1.0, abs(hi)):
            ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.15 * (hi - lo))
    ax.set_xlabel("step")
    ax.set_ylabel("loss" + (" (log scale)" if ax.get_yscale() == "log" else ""))
    ax.set_title("Training loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, out_png)


def plot_expert_load(
    loads, out_png: str | Path, steps: list[int] | None = None, layer_ids: list[int] | None = None
) -> Path:
    """Heatmap of per-expert load, normalised so that 1 = a perfectly even share (load / mean over experts).

    `loads`: a (layers x experts) array, or a list over eval steps of such arrays (steps x layers x experts;
    `steps` labels them; `layer_ids` names the rows, e.g. [1, 2, 3] when layer 0 is dense). For the 3-D form the left panel shows the last eval and the right panel the
    imbalance (max / mean load) of each layer over the evals. Blue = underused, red = overloaded.
    """
    arr = np.asarray(loads, dtype=float)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1] < 1 or arr.shape[2] < 1:
        raise ValueError(
            f"expert loads should be (layers x experts) or (evals x layers x experts), got shape {arr.shape}"
        )
    S, L, E = arr.shape
    norm_SLE = normalise_loads(arr)
    steps = list(steps) if steps is not None and len(steps) == S else list(range(S))
    layer_ids = list(layer_ids) if layer_ids is not None and len(layer_ids) == L else list(range(L))
    wide = S > 1
    w_heat = min(16.0, max(5.0, 0.32 * E + 2.5))
    fig = Figure(figsize=(w_heat + (6.0 if wide else 0.0), min(12.0, max(3.2, 0.38 * L + 1.8))), layout="constrained")
    axes = fig.subplots(1, 2, width_ratios=[w_heat, 6.0]) if wide else [fig.add_subplot()]
    ax = axes[0]
    last_LE = norm_SLE[-1]
    vmax = max(2.0, float(np.nanmax(last_LE)) if np.isfinite(last_LE).any() else 2.0)
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="0.7")  # gray (not white = balanced) for dense layers
    im = ax.imshow(
        np.ma.masked_invalid(last_LE), cmap=cmap, norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax), aspect="auto"
    )
    if L * E <= 160:  # numbers in the cells while they still fit
        for i in range(L):
            for j in range(E):
                if math.isfinite(last_LE[i, j]):
                    dark = abs(last_LE[i, j] - 1.0) > 0.55 * (vmax - 1.0)
                    ax.text(
                        j, i, f"{last_LE[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w" if dark else "k"
                    )
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    _int_ticks(ax.xaxis, E)
    _layer_ticks(ax.yaxis, layer_ids)
    title = f"Expert load at step {steps[-1]}" if wide or steps != [0] else "Expert load"
    ax.set_title(title + (" (gray: layer without routed experts)" if np.isnan(last_LE).all(axis=1).any() else ""))
    fig.colorbar(im, ax=ax, label="normalised load (1 = uniform)", shrink=0.9)
    if wide:
        _imbalance_panel(fig, axes[1], norm_SLE, steps, layer_ids)
    return _save(fig, out_png)


def normalise_loads(arr: np.ndarray) -> np.ndarray:
    """load / mean load over experts along the last axis; rows with no load (dense layers) become NaN."""
    mean = arr.mean(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, arr / np.where(mean > 0, mean, 1.0), np.nan)


def _imbalance_panel(fig: Figure, ax, norm_SLE: np.ndarray, steps: list[int], layer_ids: list[int]) -> None:
    """max / mean load of each layer over the evals: one line per layer while that stays readable
    (<= 6 layers), else a (layer x eval) heatmap."""
    L = norm_SLE.shape[1]
    with np.errstate(invalid="ignore"):
        imb_SL = np.nanmax(np.where(np.isnan(norm_SLE), -np.inf, norm_SLE), axis=-1)
    imb_SL[~np.isfinite(imb_SL)] = np.nan
    ax.set_title("Load imbalance per layer (max / mean)")
    if L > 6:
        cmap = matplotlib.colormaps["magma_r"].with_extremes(bad="0.7")
        im = ax.pcolormesh(steps, range(L), np.ma.masked_invalid(imb_SL.T), cmap=cmap, vmin=1.0, shading="nearest")
        ax.invert_yaxis()  # layer 0 on top, as in the left panel
        ax.set_xlabel("eval step")
        ax.set_ylabel("layer")
        _layer_ticks(ax.yaxis, layer_ids)
        fig.colorbar(im, ax=ax, label="max / mean expert load")
        return
    cmap = matplotlib.colormaps["viridis"]  # used up to 0.85: its last yellows are unreadable on white
    for i in range(L):
        ax.plot(
            steps,
            imb_SL[:, i],
            color=cmap(0.85 * i / max(1, L - 1)),
            lw=1.5,
            marker="o",
            ms=3,
            label=f"layer {layer_ids[i]}",
        )
    ax.axhline(1.0, color="gray", ls="--", lw=1, label="uniform")
    ax.set_xlabel("step")
    ax.set_ylabel("max / mean expert load")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def _layer_ticks(axis, layer_ids: list[int]) -> None:
    """Row i is labelled with layer_ids[i] (every row while they fit, else about 16 of them)."""
    step = max(1, math.ceil(len(layer_ids) / 16))
    rows = list(range(0, len(layer_ids), step))
    axis.set_ticks(rows, [str(layer_ids[i]) for i in rows])


def _int_ticks(axis, n: int) -> None:
    if n <= 32:
        axis.set_ticks(range(n))
    else:
        axis.set_major_locator(MaxNLocator(nbins=16, integer=True))


def _sorted_xy(d: dict[int, float]) -> tuple[list[int], list[float]]:
    xs = sorted(d)
    return xs, [d[x] for x in xs]


def _centered_mean(y: list[float], w: int) -> np.ndarray:
    """Moving average over a centred window of w points (shrunk at the ends), ignoring non-finite values.
    Centred rather than an EMA so that the smoothed curve does not lag a falling loss."""
    a = np.asarray(y, dtype=float)
    ok = np.isfinite(a)
    csum = np.concatenate([[0.0], np.cumsum(np.where(ok, a, 0.0))])
    ccnt = np.concatenate([[0], np.cumsum(ok)])
    idx = np.arange(len(a))
    lo, hi = np.maximum(0, idx - w // 2), np.minimum(len(a), idx + w // 2 + 1)
    cnt = ccnt[hi] - ccnt[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, (csum[hi] - csum[lo]) / np.maximum(cnt, 1), np.nan)


def _save(fig: Figure, out_png: str | Path) -> Path:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    return out_png
