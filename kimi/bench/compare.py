"""python -m kimi.bench compare: nanoKimi against a nanoGPT-equivalent baseline, same data, same tokens.

    python -m kimi.bench compare --config configs/bench/byte.yaml --steps 600 --eval-every 50 \
        --baseline-lrs 5e-4,1e-3,2e-3 --seeds 1337 [--ablations dense_adamw,dense_muon] [--out docs/bench/byte]
    python -m kimi.bench compare --quick          (debug shape on toy data: the test's smoke run)

Every run is a real `python -m kimi.train` process with the same seed, global batch and step count,
so every model sees the same windows in the same order (the data stream is a function of (seed, step)).
Per run it records the validation curve (train's fixed evenly spaced windows, every --eval-every steps),
the step times, and the process's peak RSS; after training, the final checkpoint is scored on the
*whole* validation split in non-overlapping windows. The baseline's lr is swept on the first seed and
its best lr (lowest whole-split loss) is the reference for the other seeds and for the ratios:

  tokens_to_baseline   tokens a model needs before its validation curve first reaches the best baseline's
                       final curve loss (linear interpolation between evals; None if never reached)
  speedup_tokens       baseline's tokens to that loss / the model's (> 1: the model converges faster)
  time_to_baseline_s   the same on the clock: training seconds (the sum of step times; evals left out)
  speedup_time         baseline's seconds to that loss / the model's (ratios of runs that shared the CPU
                       with --jobs > 1 hold only when each had its own cores: one thread per run)

With dense_muon among the runs, results.md also tables each variant's validation loss minus dense_muon's
at every eval (mean and range over seeds) with its trend over the last half of the budget
(kimi/bench/trend.py), and gap_vs_tokens.png draws it.

Writes results.json, results.md, val_vs_tokens.png, val_vs_time.png under --out, and logs every run
(and a summary run with the table and plots) to MLflow (`--tracking-uri`; default sqlite in --out).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from kimi.bench.children import Children
from kimi.bench.lr_sweep import name_by_lr, plot_lr_sweep
from kimi.bench.tables import vm_hwm
from kimi.bench.trend import gap_trend, trend_line
from kimi.bench.variants import ABLATIONS, Variant, build_variants, flatten, param_counts
from kimi.config import LoggingConfig, load_config, parse_overrides

QUICK_CONFIG = "configs/debug.yaml"
CHILDREN = Children()  # the kimi.train processes this compare started
DENSE_REFERENCE = "dense_muon"  # the reference when no nanoGPT baseline ran ("when does MoE beat dense?")


# ----------------------------------------------------------------------------- measuring one model


def full_split_loss(model: torch.nn.Module, dataset, batch_size: int = 16, max_windows: int | None = None) -> dict:
    """Mean cross entropy over the whole split cut into non-overlapping block_size windows (the last
    partial window is dropped): deterministic, and every token is scored exactly once. `max_windows`
    keeps only the first windows (--quick on the 1M-token toy split; real runs score everything)."""
    from kimi.trainer.validator import evaluate

    device = next(model.parameters()).device
    return evaluate(model, dataset.split_batches(batch_size, max_windows), device)


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """First token count at which the (tokens, loss) curve reaches `target`, interpolating linearly
    between the evals around the crossing; None if it never does."""
    prev = None
    for tok, loss in curve:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return float(tok)
            (t0, l0) = prev
            return t0 + (tok - t0) * (l0 - target) / (l0 - loss)
        prev = (tok, loss)
    return None


def _run_training(cmd: list[str], log_path: Path, env: dict, append: bool = False) -> tuple[int, float, int | None]:
    """Run to completion; return (exit code, wall seconds, the child's own peak RSS in bytes). The peak is
    polled from /proc every 0.2 s; it is monotone, so the last read is the peak of all but the last instants."""
    t0 = time.perf_counter()
    peak = None
    with open(log_path, "a" if append else "w") as logf:
        p = CHILDREN.popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
        while p.poll() is None:
            peak = vm_hwm(p.pid) or peak
            time.sleep(0.2)
    CHILDREN.done(p)  # after SIGTERM: Stopped, so a stopped run is neither scored nor reported failed
    return p.returncode, time.perf_counter() - t0, peak


def run_one(config: str, v: Variant, seed: int, steps: int, eval_every: int, eval_batches: int,
            out: Path, tracking_uri: str | None, max_windows: int | None = None, resume: bool = False) -> dict:  # fmt: skip
    """Train one (variant, seed) as a real `kimi.train` process and score it. `resume`: keep a checkpoint
    every eval and continue a run a killed compare left behind (bit-exact on CPU: the same curve as one
    uninterrupted run); a run that finished before is read back from its result.json, not trained again."""
    from kimi.data.mixture import build_data
    from kimi.loading import load_model

    run_dir = out / "runs" / f"{v.name}-s{seed}"
    args = [
        *flatten(v.overrides),  # the command line's overrides are merged in there
        f"--train.max_steps={steps}",
        f"--train.seed={seed}",
        f"--train.out_dir={run_dir}",
        f"--train.eval_interval={eval_every}",
        f"--train.eval_batches={eval_batches}",
        "--train.log_interval=1",
        f"--train.ckpt_interval={eval_every if resume else 0}",
        "--train.keep_last=1",
        *([] if resume else ["--train.resume=false"]),  # default: resume when the run dir has a checkpoint
        f"--logging.mlflow={tracking_uri is not None}",
        "--logging.experiment=kimi-bench-compare",
        f"--logging.run_name={v.name}-s{seed}",
    ]
    if tracking_uri:
        args.append(f"--logging.tracking_uri={tracking_uri}")
    if resume and (run_dir / "result.json").exists():
        done = json.loads((run_dir / "result.json").read_text())
        if done.get("args") != args:  # another budget or recipe: its result would be tabled as this one's
            raise ValueError(f"--resume: {run_dir} finished with other settings ({done.get('args')}); "
                             "give another --out, or delete that run directory to train it again")  # fmt: skip
        return done
    if run_dir.exists() and not resume:
        import shutil

        shutil.rmtree(run_dir)
    env = dict(os.environ, MLFLOW_LOGGING_LEVEL="WARNING")
    cmd = [sys.executable, "-m", "kimi.train", "--config", config, *args]
    rc, wall, rss = _run_training(cmd, out / "runs" / f"{v.name}-s{seed}.log", env, append=resume)
    if rc != 0:
        tail = (out / "runs" / f"{v.name}-s{seed}.log").read_text().strip().splitlines()[-3:]
        raise RuntimeError(f"{v.name} (seed {seed}) failed with exit code {rc}: {' | '.join(tail)}")
    cfg = load_config(config, [*args])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tok_per_step = cfg.train.global_batch_size * cfg.block_size
    t_cum, curve, curve_time = 0.0, [], []
    for r in rows:
        t_cum += r.get("step_time_s", 0.0)
        if "val_loss" in r:
            curve.append((r["step"] * tok_per_step, r["val_loss"]))
            curve_time.append((t_cum, r["val_loss"]))
    model = load_model(run_dir / "checkpoints" / "latest")
    val = build_data(cfg.data, cfg.block_size, cfg.model.vocab_size, seed, split="val")
    final = full_split_loss(model, val, max_windows=max_windows)
    train_time = sum(r.get("step_time_s", 0.0) for r in rows)
    by_position = {}
    if cfg.block_size > 256:  # long windows: is the context used? (kimi/bench/positions.py)
        from kimi.bench.positions import bucket_edges, loss_by_position

        by_position = loss_by_position(model, val, bucket_edges(cfg.block_size), max_windows=max_windows)
    result = {
        "variant": v.name, "group": v.group, "lr": cfg.optim.lr, "seed": seed, "about": v.about,
        **param_counts(cfg), "tokens": steps * tok_per_step, "curve": curve, "curve_time": curve_time,
        "final_curve_val": curve[-1][1] if curve else None, "final_val_loss": final["loss"],
        "val_tokens": final["tokens"], "train_time_s": train_time, "train_steps": len(rows), "wall_s": wall,
        "tokens_per_s": steps * tok_per_step / train_time if train_time else None, "peak_rss_bytes": rss,
        "val_loss_by_position": by_position, "kv_bytes_per_token": model.kv_cache_bytes_per_token(),
    }  # fmt: skip
    result["args"] = args  # the command line it trained with: a later --resume checks it
    (run_dir / "result.json").write_text(json.dumps(result))
    return result


# ----------------------------------------------------------------------------- summarising


def _mean_spread(xs: list[float | None]) -> tuple[float | None, float | None, int]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None, 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0), len(xs)


def summarise(runs: list[dict], best_baseline: str) -> list[dict]:
    """One row per variant (best baseline lr only for the baseline group), means and spreads over seeds."""
    base = {r["seed"]: r for r in runs if r["variant"] == best_baseline}

    def reach(run: dict | None, key: str, target: float | None) -> float | None:
        return tokens_to_reach(run[key], target) if run and run.get(key) and target is not None else None

    for r in runs:
        b = base.get(r["seed"])
        target = b["final_curve_val"] if b else None
        r["target_loss"] = target
        # Tokens to the baseline's final loss, and the same on the clock: training seconds (the sum of
        # step times, evals left out), each against the baseline's own.
        for x, key, ratio in (("curve", "tokens_to_baseline", "speedup_tokens"),
                              ("curve_time", "time_to_baseline_s", "speedup_time")):  # fmt: skip
            r[key], b_x = reach(r, x, target), reach(b, x, target)
            r[ratio] = b_x / r[key] if b_x and r[key] else None
    names = list(dict.fromkeys(r["variant"] for r in runs))
    rows = []
    for name in names:
        rs = [r for r in runs if r["variant"] == name]
        row = {k: rs[0][k] for k in ("variant", "group", "about", "lr", "params_total", "params_active",
                                     "params_non_embedding", "params_active_non_embedding", "tokens")}  # fmt: skip
        for k in ("final_val_loss", "tokens_to_baseline", "speedup_tokens", "time_to_baseline_s", "speedup_time",
                  "train_time_s", "tokens_per_s", "peak_rss_bytes"):  # fmt: skip
            row[k], row[k + "_std"], row[k + "_n"] = _mean_spread([r.get(k) for r in rs])
        row["n_seeds"] = len(rs)
        # A seed that never reached the reference's loss has no tokens or seconds to it: the mean is over
        # the seeds that did, and the table says how many of them there were.
        row["n_reached"] = row["tokens_to_baseline_n"]
        row["reference"] = name == best_baseline
        rows.append(row)
    return rows


def _fmt(x, spec: str, std=None) -> str:
    if x is None:
        return "-"
    s = format(x, spec)
    return s + (f" ± {format(std, spec)}" if std else "")


def _fmt_reached(r: dict, key: str, spec: str) -> str:
    """A mean over the seeds that have the number: '-' if none has it, '(k of n seeds)' if only some do (a seed
    that never reached the reference's loss has no tokens to it; a partial record has no whole-split loss)."""
    s = _fmt(r[key], spec, r[key + "_std"])
    k, n = r.get(key + "_n", r["n_seeds"]), r["n_seeds"]
    return s if k in (0, n) else f"{s} ({k} of {n} seeds)"


def markdown_table(rows: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| variant | lr | params total / active / non-emb (M) | active non-emb (M) | val loss (whole split) | "
        "tokens to baseline loss | speed-up (tokens) | train s to baseline loss | speed-up (time) | train s | "
        "tokens/s | peak RSS MB | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = f"**{r['variant']}** (reference)" if r["reference"] else r["variant"]
        lines.append(
            f"| {name} | {r['lr']:g} | {r['params_total'] / 1e6:.2f} / {r['params_active'] / 1e6:.2f} / "
            f"{r['params_non_embedding'] / 1e6:.2f} | {r['params_active_non_embedding'] / 1e6:.3f} | "
            f"{_fmt_reached(r, 'final_val_loss', '.4f')} | "
            f"{_fmt_reached(r, 'tokens_to_baseline', ',.0f')} | {_fmt_reached(r, 'speedup_tokens', '.2f')} | "
            f"{_fmt_reached(r, 'time_to_baseline_s', ',.0f')} | {_fmt_reached(r, 'speedup_time', '.2f')} | "
            f"{_fmt(r['train_time_s'], '.0f')} | "
            f"{_fmt(r['tokens_per_s'], ',.0f')} | {_fmt(r['peak_rss_bytes'] and r['peak_rss_bytes'] / 2**20, '.0f')} | "
            f"{r['n_seeds']} |"
        )
    return "\n".join(lines) + "\n"


def position_table(runs: list[dict]) -> str:
    """Whole-split loss by window position per variant (mean over seeds) and its KV-cache bytes per token;
    empty for short windows (runs without `val_loss_by_position`)."""
    runs = [r for r in runs if r.get("val_loss_by_position")]
    if not runs:
        return ""
    buckets = list(runs[0]["val_loss_by_position"])
    lines = ["", f"| variant | KV bytes/token (bf16) | {' | '.join(f'loss at {b}' for b in buckets)} | seeds |",
             f"|---|---|{'---|' * len(buckets)}---|"]  # fmt: skip
    for name in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == name]
        cells = []
        for b in buckets:
            mean, std, _ = _mean_spread([r["val_loss_by_position"].get(b) for r in rs])
            cells.append(_fmt(mean, ".4f", std))
        lines.append(f"| {name} | {rs[0]['kv_bytes_per_token']:,} | {' | '.join(cells)} | {len(rs)} |")
    return "\n".join(lines) + "\n"


def plot_curves(runs: list[dict], out: Path, keep: set[str]) -> list[Path]:
    """val loss against tokens and against training seconds, one line per (variant, seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, xlabel, fname in (("curve", "training tokens", "val_vs_tokens.png"),
                               ("curve_time", "training seconds (sum of step times)", "val_vs_time.png")):  # fmt: skip
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for r in runs:
            if r["variant"] in keep and r[key]:
                xs, ys = zip(*r[key])
                ax.plot(xs, ys, label=f"{r['variant']} s{r['seed']}", lw=1.2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=90)
        plt.close(fig)
        paths.append(out / fname)
    return paths


def gaps_by_tokens(runs: list[dict], reference: str = DENSE_REFERENCE) -> dict[str, dict[int, list[float]]]:
    """Per variant: {tokens: [its validation loss - `reference`'s, one per seed]} at the evals both ran
    (same eval schedule, so the curves share their token counts). Empty when the reference did not run."""
    ref = {r["seed"]: dict(r["curve"]) for r in runs if r["variant"] == reference}
    out: dict[str, dict[int, list[float]]] = {}
    for r in runs:
        if r["variant"] == reference or r["seed"] not in ref:
            continue
        gaps = out.setdefault(r["variant"], {})
        for tok, loss in r["curve"]:
            if tok in ref[r["seed"]]:
                gaps.setdefault(tok, []).append(loss - ref[r["seed"]][tok])
    return {name: dict(sorted(g.items())) for name, g in out.items() if g}


def gap_table(runs: list[dict], reference: str = DENSE_REFERENCE) -> str:
    """The gap against `reference` at every eval: mean, min and max over seeds (below zero: ahead)."""
    gaps = gaps_by_tokens(runs, reference)
    if not gaps:
        return ""
    names = list(gaps)
    toks = sorted({t for g in gaps.values() for t in g})
    lines = ["", f"Validation loss minus {reference}'s at the same tokens (same seed), mean [min, max] over seeds:", "",
             f"| tokens | {' | '.join(names)} |", f"|---|{'---|' * len(names)}"]  # fmt: skip
    for t in toks:
        cells = [f"{statistics.fmean(g[t]):+.4f} [{min(g[t]):+.4f}, {max(g[t]):+.4f}] ({len(g[t])})" if t in g else "-"
                 for g in gaps.values()]  # fmt: skip
        lines.append(f"| {t:,} | {' | '.join(cells)} |")
    lines += ["", "The trend of each mean gap (kimi/bench/trend.py; a line in log2 tokens, extrapolated):", ""]
    lines += [trend_line(n, gap_trend({t: statistics.fmean(v) for t, v in g.items()})) for n, g in gaps.items()]
    return "\n".join(lines) + "\n"


def plot_gap(runs: list[dict], out: Path, reference: str = DENSE_REFERENCE) -> list[Path]:
    """`gaps_by_tokens` drawn: the mean over seeds and the min-max band. Below zero the variant is ahead.
    Nothing when the reference did not run."""
    gaps = gaps_by_tokens(runs, reference)
    if not gaps:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, g in gaps.items():
        toks, n = list(g), max(len(v) for v in g.values())
        ax.plot(toks, [statistics.fmean(g[t]) for t in toks], lw=1.3, label=f"{name} ({n} seed{'s' * (n > 1)})")
        ax.fill_between(toks, [min(g[t]) for t in toks], [max(g[t]) for t in toks], alpha=0.2)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xlabel("training tokens")
    ax.set_ylabel(f"validation loss - {reference}'s (nats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "gap_vs_tokens.png", dpi=90)
    plt.close(fig)
    return [out / "gap_vs_tokens.png"]


def log_summary(out: Path, tracking_uri: str, rows: list[dict], files: list[Path], params: dict) -> None:
    from kimi.tracking import Tracker

    tr = Tracker(str(out / "summary"), LoggingConfig(tracking_uri=tracking_uri, experiment="kimi-bench-compare",
                 run_name="compare-summary", system_metrics_interval=0), params=params)  # fmt: skip
    for r in rows:
        tr.log(0, {f"{r['variant']}/{k}": r[k] for k in ("final_val_loss", "speedup_tokens", "tokens_per_s",
                                                         "peak_rss_bytes") if r[k] is not None})  # fmt: skip
    for f in files:
        tr.log_artifact(f)
    tr.run_id  # noqa: B018  (wait for the connection: a short job could otherwise end before it opens)
    tr.finish("FINISHED")


# ----------------------------------------------------------------------------- the command


def compare(config: str, steps: int, eval_every: int, eval_batches: int, baseline_lrs: list[float],
            seeds: list[int], ablations: list[str], out: Path, extra: list[str], mlflow: bool = True,
            tracking_uri: str | None = None, max_windows: int | None = None, jobs: int = 1, log=print,
            only: list[str] = (), tag: str = "", resume: bool = False) -> dict | None:  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "runs").mkdir(exist_ok=True)
    if mlflow and tracking_uri is None:
        tracking_uri = f"sqlite:///{(out / 'runs' / 'mlflow.db').resolve()}"
    uri = tracking_uri if mlflow else None
    variants, target = build_variants(config, baseline_lrs, ablations, parse_overrides(extra))
    if only:  # train a subset (the baseline still sets the matched size); table later with --from-runs
        unknown = sorted(set(only) - {v.name for v in variants})
        if unknown:
            raise ValueError(f"--only {','.join(unknown)}: not among {', '.join(v.name for v in variants)}")
        variants = [v for v in variants if v.name in only]
    if tag:  # a recipe variant (the command line's overrides) tabled beside the plain runs: kimi -> kimi+tag
        for v in variants:
            if v.group != "nanogpt":
                v.name, v.group, v.about = f"{v.name}+{tag}", f"{v.group}+{tag}", f"{v.about}; {' '.join(extra)}"
    log(f"compare: {len(variants)} variants at {target / 1e6:.3f}M active non-embedding params, seeds {seeds}")
    runs: list[dict] = []
    failed: list[str] = []

    def go(v: Variant, seed: int) -> None:
        try:
            r = run_one(config, v, seed, steps, eval_every, eval_batches, out, uri, max_windows, resume)
        except RuntimeError as e:  # one broken variant is reported; the others still run and are tabled
            failed.append(str(e))
            log(f"  FAILED: {e}")
            return
        runs.append(r)
        log(f"  {v.name:<18} seed {seed}: whole-split val {r['final_val_loss']:.4f} | "
            f"{r['tokens_per_s']:,.0f} tok/s | {r['wall_s']:.0f}s | RSS {(r['peak_rss_bytes'] or 0) / 2**20:.0f} MB")  # fmt: skip
        (out / "runs.json").write_text(json.dumps(runs, indent=1))  # partial results survive an interruption

    # First seed: every variant (the baseline's lr sweep included); then the best baseline lr and the others.
    # `jobs` > 1 trains that many at once: tokens-to-loss is unchanged, wall-clock columns then share the CPU.
    # SIGTERM stops the training children too (each saves a checkpoint: --resume continues it; children.py)
    with CHILDREN.on_sigterm(), ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(lambda v: go(v, seeds[0]), variants))
        has_ref = any(r["group"] == "nanogpt" or r["variant"] == DENSE_REFERENCE for r in runs)
        best = best_baseline(runs) if has_ref or not only else None
        later = [(v, s) for s in seeds[1:] for v in variants if v.group != "nanogpt" or v.name == best]
        list(pool.map(lambda vs: go(*vs), later))
    if best is None:
        log(
            f"compare: neither a baseline nor {DENSE_REFERENCE} in --only; runs in {out / 'runs.json'}: "
            "table them with --from-runs (--reference VARIANT measures the others against one of them)"
        )
        return None
    cfg = load_config(config, extra)
    return write_results(runs, out, config, f"{steps} steps x {cfg.train.global_batch_size * cfg.block_size} tokens",
                         tracking_uri if mlflow else None, failed, log)  # fmt: skip


def best_baseline(runs: list[dict]) -> str:
    """The nanoGPT lr with the lowest whole-split loss; without baseline runs, `dense_muon` (the modern
    dense block with Muon: what the MoE has to beat at equal active parameters)."""
    base = [r for r in runs if r["group"] == "nanogpt"]
    if not base and any(r["variant"] == DENSE_REFERENCE for r in runs):
        return DENSE_REFERENCE
    if not base:
        names = ", ".join(dict.fromkeys(r["variant"] for r in runs))
        raise ValueError(f"no nanoGPT baseline or {DENSE_REFERENCE} run among the finished runs ({names or 'none'}); "
                         "see the logs under OUT/runs/ if one failed, or table them with --reference VARIANT")  # fmt: skip
    return min(base, key=lambda r: r["final_val_loss"])["variant"]


def write_results(runs: list[dict], out: Path, config: str, budget: str, tracking_uri: str | None,
                  failed: list[str] = (), log=print, reference: str | None = None, from_runs: str = "") -> dict:  # fmt: skip
    """Table, JSON, plots (and the MLflow summary run) from finished runs, also runs merged from several
    `compare` outputs (`from_runs`, the runs.json files): the best baseline lr is picked over all of them,
    unless `reference` names the variant every other is measured against (e.g. kimi for its own ablations).
    The table's header names this machine's threads only when the runs trained here and now."""
    out.mkdir(parents=True, exist_ok=True)
    runs = name_by_lr(runs)
    order = list(dict.fromkeys(r["variant"] for r in sorted(runs, key=lambda r: r["group"] != "nanogpt")))
    runs = sorted(runs, key=lambda r: (order.index(r["variant"]), r["seed"]))
    if reference and reference not in order:
        raise ValueError(f"--reference={reference}: no such variant in the runs; give one of {', '.join(order)}")
    best = reference or best_baseline(runs)
    rows = summarise(runs, best)
    seeds = sorted({r["seed"] for r in runs})
    if from_runs:  # tabled afterwards: the runs' config, threads and torch were theirs, not this process's
        origin, command, env = {"from_runs": from_runs}, f"--from-runs {from_runs}", "tabled at"
    else:
        origin, command = {"config": config}, f"--config {config}"
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else (
            f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs")  # fmt: skip
        env = f"{device}, torch {torch.__version__},"
    header = (f"`python -m kimi.bench compare {command}`: {budget}, seeds {seeds}, {env} "
              f"commit {_git_commit()}, {time.strftime('%Y-%m-%d')}")  # fmt: skip
    gap_ref = reference or DENSE_REFERENCE
    gaps = gap_table([r for r in runs if r["group"] != "nanogpt"], gap_ref)
    md = markdown_table(rows, header) + gaps + position_table(runs) + "".join(f"\nFAILED: {f}\n" for f in failed)
    result = {**origin, "budget": budget, "seeds": seeds, "best_baseline": best, "rows": rows, "runs": runs,
              "failed": list(failed), "commit": _git_commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}  # fmt: skip
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(md)
    files = [out / "results.json", out / "results.md"]
    files += plot_curves(runs, out, {r["variant"] for r in rows if r["variant"] == best or r["group"] != "nanogpt"})
    files += plot_gap([r for r in runs if r["group"] != "nanogpt"], out, gap_ref)
    files += plot_lr_sweep(rows, out)
    if tracking_uri:
        log_summary(out, tracking_uri, rows, files, {**origin, "budget": budget, "seeds": str(seeds)})
    log(md)
    return result


def _git_commit() -> str | None:
    """The short commit of the code that ran (not of the cwd's repo), "-dirty" with uncommitted changes."""
    from kimi.files import git_state

    commit, dirty = git_state(Path(__file__).resolve().parent)
    return commit and commit[:9] + ("-dirty" if dirty else "")


def add_args(p) -> None:
    p.add_argument("--baseline-lrs", default="5e-4,1e-3,2e-3", help="the baseline's lr sweep (nanoGPT: 1e-3)")
    p.add_argument("--seeds", default="1337", help="comma-separated; the lr sweep runs on the first")
    p.add_argument("--ablations", default="", help=f"comma-separated, from: {', '.join(ABLATIONS)}, or 'all' "
                   "(throughput: time these beside kimi instead of the nanoGPT pair)")  # fmt: skip
    p.add_argument("--eval-every", type=int, default=None, help="steps between validation evals (default steps/10)")
    p.add_argument("--eval-batches", type=int, default=None, help="default: the config's train.eval_batches")
    p.add_argument("--out", default="out/bench/compare")
    p.add_argument("--no-mlflow", action="store_true")
    p.add_argument("--from-runs", default=None, help="comma-separated runs.json files of earlier compares: "
                   "no training, one table over all of them (e.g. an lr sweep finished in two goes; a variant run "
                   "at several --optim.lr values is tabled per lr, as NAME@lrX)")  # fmt: skip
    p.add_argument(
        "--jobs", type=int, default=1, help="training processes at once (wall-clock columns then share CPUs)"
    )
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--only", default="", help="comma-separated variant names to train (e.g. kimi,dense_muon); "
                   "the others only set the matched size. Table with --from-runs")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="checkpoint each run at every eval and continue "
                   "the runs a killed compare left (bit-exact on CPU); finished runs are not trained again")  # fmt: skip
    p.add_argument("--reference", default="", help="with --from-runs: the variant the others are measured "
                   "against (default: the best baseline lr, else dense_muon), e.g. kimi for kimi_mha; "
                   "throughput --ablations: the variant speeds are relative to (default dense_muon, else kimi)")  # fmt: skip
    p.add_argument("--tag", default="", help="suffix for the non-baseline variants' names (kimi -> kimi+TAG): "
                   "recipe changes given as overrides, tabled beside the plain runs")  # fmt: skip


def main(args, overrides: list[str]) -> None:
    config = QUICK_CONFIG if args.quick else args.config
    if args.from_runs:
        runs = [r for f in args.from_runs.split(",") if f for r in json.loads(Path(f).read_text())]
        budget = "/".join(f"{t:,}" for t in sorted({r["tokens"] for r in runs})) + " tokens"
        uri = None if args.no_mlflow else args.tracking_uri or f"sqlite:///{Path(args.out).resolve() / 'mlflow.db'}"
        write_results(
            runs, Path(args.out), config, budget, uri, reference=args.reference or None, from_runs=args.from_runs
        )
        return
    if args.reference:
        raise ValueError("--reference only tables finished runs: give it with --from-runs")
    steps = args.steps
    lrs = [float(x) for x in args.baseline_lrs.split(",") if x]
    abl = list(ABLATIONS) if args.ablations == "all" else [a for a in args.ablations.split(",") if a]
    mlflow = not args.no_mlflow
    if args.quick:  # tiny: the debug shape on toy data, 2 lrs, a handful of steps, MLflow only if a URI is given
        steps, lrs, mlflow = 6, lrs[:2], args.tracking_uri is not None
        overrides = [*overrides, "--data.dataset=toy", "--data.mix=", "--train.global_batch_size=4", "--train.micro_batch_size=4",
                     "--optim.warmup_steps=1"]  # fmt: skip
    if len(lrs) < 1:
        raise ValueError("--baseline-lrs needs at least one value, e.g. 5e-4,1e-3,2e-3")
    eval_every = args.eval_every or max(1, steps // 10)
    eval_batches = args.eval_batches or (1 if args.quick else load_config(config, overrides).train.eval_batches)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    compare(config, steps, eval_every, eval_batches, lrs, seeds, abl, Path(args.out), overrides,
            mlflow=mlflow, tracking_uri=args.tracking_uri, max_windows=16 if args.quick else None,
            jobs=args.jobs, only=[v for v in args.only.split(",") if v], tag=args.tag, resume=args.resume)  # fmt: skip
