"""The training loop, written once.

    python -m kimi.train --config configs/nano.yaml [--max-steps N] [--out-dir DIR] [--resume]
                         [--section.key=value ...]
    torchrun --nproc_per_node=8 -m kimi.train --config configs/small.yaml --parallel.ep=8

The same code runs on one CPU process and under torchrun: distribution is applied from outside by an
engine (`--parallel.engine=fsdp2|deepspeed`, kimi/engine/: the loop calls backward, clip_grad_norm,
step/skip, save/load and never asks which one it has), the data stream is fixed by (seed, step) and sliced per rank, and the
global batch comes from the config, so any world size trains the same model.

Preemption: SIGTERM / SIGUSR1 finish the current step, write a checkpoint and exit with
`REQUEUE_EXIT_CODE` (3); a run whose out_dir already holds a checkpoint resumes from it.

NaN/inf: a step whose loss or gradient norm is not finite is never applied; `train.nonfinite` says
whether the run stops there (exit 4) or skips the step (see kimi/nonfinite.py). Weights that hold
NaN/inf are never saved, so `checkpoints/latest` always points at finite weights.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from kimi.checkpoint import CheckpointError
from kimi.config import Config, ConfigError, load_config
from kimi.engine import Engine, build_engine
from kimi.nonfinite import NONFINITE_EXIT_CODE, NonFiniteError, NonFiniteGuard, weights_finite
from kimi.runtime import Runtime, peak_flops, setup_runtime

log = logging.getLogger("kimi.train")
REQUEUE_EXIT_CODE = 3


class UserError(ValueError):
    """Bad input from the user: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------- building blocks


@dataclass
class Run:
    """Everything a training step touches, wired once by `build`."""

    cfg: Config
    rt: Runtime
    engine: Engine  # the model, its optimizer, schedule and checkpoints, behind kimi/engine/base.py
    qk_clip: object | None
    batches: object  # BatchIterator
    val_set: object | None

    @property
    def model(self) -> torch.nn.Module:  # what to call: possibly parallelized / wrapped
        return self.engine.model

    @property
    def raw_model(self) -> torch.nn.Module:  # the KimiModel itself (for its helpers)
        return self.engine.raw_model


def build(cfg: Config, rt: Runtime) -> Run:
    from kimi.data.dataset import BatchIterator, build_dataset
    from kimi.model import KimiModel
    from kimi.optim import QKClip

    check_out_dir(cfg.train.out_dir)  # before minutes of building: a bad path is one line, not a traceback
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    engine = build_engine(cfg, KimiModel(cfg.model).to(rt.device), rt)
    qk_clip = None
    if cfg.optim.qk_clip:
        attn = engine.raw_model.attention_layers()
        qk_clip = QKClip(attn, tau=cfg.optim.qk_clip_tau, reduce_fn=rt.all_reduce_max, scale_fn=engine.scale_rows_)
    train_set = build_dataset(cfg.data, cfg.block_size, cfg.model.vocab_size, cfg.train.seed, split="train")
    batches = BatchIterator(train_set, cfg.train.global_batch_size, cfg.train.micro_batch_size, rt.rank, rt.world)
    val_set = None
    if cfg.train.eval_interval > 0:
        val_set = build_dataset(cfg.data, cfg.block_size, cfg.model.vocab_size, cfg.train.seed, split="val")
    return Run(cfg, rt, engine, qk_clip, batches, val_set)


def train_state(run: Run, step: int, mlflow_run_id: str | None) -> dict:
    return {
        "step": step,
        "scheduler": run.engine.scheduler.state_dict(),
        "data": run.batches.state_dict(),
        "mlflow_run_id": mlflow_run_id,
    }


def check_out_dir(out_dir: str) -> None:
    """Create the out_dir (every rank may: the filesystem is shared) and prove it takes files."""
    p = Path(out_dir)
    if p.exists() and not p.is_dir():
        raise UserError(f"--out-dir '{p}' is an existing file, not a directory; choose another --out-dir")
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--out-dir '{p}' cannot be written ({e.strerror}); choose another --out-dir") from None


def restore(run: Run) -> tuple[int, str | None]:
    """Resume from the run's latest checkpoint when there is one (or when --resume demands it). This
    run's config holds from here on; what differs from the checkpoint's is printed in one line."""
    from kimi.checkpoint import config_changes

    want, ckpt, engine = run.cfg.train.resume, run.engine.ckpt, run.engine
    latest = engine.latest()
    if latest is None:
        if want:
            raise UserError(f"--resume: no checkpoint under '{ckpt.dir}'; drop --resume to start fresh")
        if ckpt.incomplete_steps():  # never train from step 0 on top of checkpoints we cannot read
            raise UserError(
                f"'{ckpt.dir}' holds step directories but none is complete (no meta.json): "
                f"{', '.join(p.name for p in ckpt.incomplete_steps())}; move them away or use another --out-dir"
            )
        return 0, None
    if want is False:
        raise UserError(
            f"'{run.cfg.train.out_dir}' already holds a checkpoint ({latest.name}); "
            "use another --out-dir, or drop --train.resume=false to continue it"
        )
    if not ckpt.link_ok():
        run.rt.print(
            f"'{ckpt.dir / 'latest'}' is missing or points to a deleted step; "
            f"resuming from the newest complete checkpoint, {latest.name}"
        )
    changes = config_changes(latest, run.cfg)  # raises CheckpointError where a change cannot work
    # Optimizer and scheduler state come back with the old run's hyperparameters (lr, weight decay,
    # betas, base lrs): put this config's back, keeping only the position (step count, moments).
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    base_lrs = list(engine.scheduler.base_lrs)
    state, meta = engine.load(latest)
    sched = engine.scheduler
    sched.load_state_dict(state["scheduler"])
    sched.base_lrs = base_lrs
    for group, h, base, fn in zip(engine.optimizer.param_groups, hyper, base_lrs, sched.lr_lambdas):
        group.update(h)
        group["lr"] = base * fn(sched.last_epoch)  # the schedule also follows a new max_steps
    run.batches.load_state_dict(state["data"])
    run.rt.print(f"resumed from {latest} (step {state['step']}, written at world size {meta.get('world_size')})")
    if changes:
        run.rt.print("config differs from the checkpoint: " + ", ".join(changes))
    return state["step"], state.get("mlflow_run_id")


def autocast(rt: Runtime):
    if rt.amp_dtype is None:
        return torch.autocast(rt.device.type, enabled=False)
    return torch.autocast(rt.device.type, dtype=rt.amp_dtype)


@torch.no_grad()
def evaluate(run: Run) -> float:
    """Mean validation loss over fixed windows; every rank evaluates its slice of each batch."""
    cfg, rt = run.cfg, run.rt
    run.model.eval()
    total, n = torch.zeros((), device=rt.device), 0
    per_rank = max(1, cfg.train.global_batch_size // rt.world)
    for x, y in run.val_set.eval_batches(cfg.train.eval_batches, per_rank * rt.world):
        x, y = x[rt.rank * per_rank : (rt.rank + 1) * per_rank], y[rt.rank * per_rank : (rt.rank + 1) * per_rank]
        for i in range(0, per_rank, cfg.train.micro_batch_size):
            xs, ys = (
                x[i : i + cfg.train.micro_batch_size].to(rt.device),
                y[i : i + cfg.train.micro_batch_size].to(rt.device),
            )
            with autocast(rt):
                total += run.model(xs, ys).ce_loss.float() * xs.shape[0]
            n += xs.shape[0]
    run.model.train()
    return rt.all_reduce_mean(total / n).item()


def routing_update(run: Run) -> dict:
    """All-reduce this step's per-expert token counts, update the aux-loss-free biases, return stats."""
    from kimi.parallel import all_reduce_routing_counts

    moes = run.raw_model.moe_layers()
    if not moes:
        return {}
    counts_LE = all_reduce_routing_counts(run.raw_model, run.rt.dp_group)
    stats = [moe.routing_stats(c) for moe, c in zip(moes, counts_LE)]
    for moe, c in zip(moes, counts_LE):
        moe.update_bias(c)
    return {
        "expert_imbalance": sum(s["max_load"] for s in stats) / len(stats),
        "router_entropy": sum(s["router_entropy"] for s in stats) / len(stats),
        "_loads_LE": counts_LE,
    }


def apply_update(run: Run, profile: bool) -> tuple[dict, dict, float]:
    """The engine's step (optimizer, schedule, zero grads), then QK-clip and the router-bias update from
    this step's statistics; returns (QK-clip stats, routing stats, optimizer time in s, 0 unless profiling)."""
    t_opt = run.rt.sync_time() if profile else 0.0
    run.engine.step()
    t_opt = run.rt.sync_time() - t_opt if profile else 0.0
    qk = run.qk_clip.step() if run.qk_clip else run.rt.max_logit_stats(run.raw_model)
    return qk, routing_update(run), t_opt


def discard_update(run: Run) -> None:
    """A skipped step leaves weights, optimizer state and router biases as they were, and forgets the
    attention maxima and routing counts its forward recorded (the next step starts clean); the lr
    schedule still advances (it stays tied to the step number)."""
    run.engine.skip()
    for layer in run.raw_model.attention_layers():
        if hasattr(layer, "reset_max_logits"):
            layer.reset_max_logits()
    for moe in run.raw_model.moe_layers():
        moe.discard_counts()


def nonfinite_hint(run: Run) -> str:
    """The end of the line that stops a run on NaN/inf: what to try, and which checkpoint is good."""
    latest = run.engine.latest()
    where = f"checkpoints/latest is still {latest.name}" if latest else "no checkpoint was written"
    skip = ", or --train.nonfinite=skip to drop such steps" if run.cfg.train.nonfinite == "stop" else ""
    return f"Try a lower --optim.lr (now {run.cfg.optim.lr:g}) or check the data{skip}; {where}."


def save_checkpoint(run: Run, step: int, meta: dict, mlflow_run_id: str | None) -> None:
    """Write step `step`, unless the weights hold NaN/inf: those never replace the last good checkpoint."""
    if not weights_finite(run.model, run.rt.all_reduce_max):
        raise NonFiniteError(f"step {step}: the weights hold NaN/inf, not saving them. {nonfinite_hint(run)}")
    run.engine.save(step, train_state(run, step, mlflow_run_id), run.cfg.to_yaml(), meta)


def a2a_stats(model) -> dict:
    """Expert-parallel all-to-all traffic of this step (forward, this rank), then reset the counters."""
    stats = [m.dispatcher.stats for m in model.moe_layers() if hasattr(m.dispatcher, "stats")]
    if not stats:
        return {}
    row = {"a2a_MB": sum(s["a2a_bytes"] for s in stats) / 1e6}
    if any(s["a2a_s"] for s in stats):
        row["a2a_ms"] = 1000 * sum(s["a2a_s"] for s in stats)
    for s in stats:
        s["a2a_bytes"], s["a2a_s"] = 0, 0.0
    return row


# ----------------------------------------------------------------------------- the loop


class Preemption:
    """SIGTERM / SIGUSR1 set a flag; the loop reads it once per step, before the update (agreed across
    ranks), and saves and exits after that step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGUSR1)}

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def restore(self) -> None:
        """Give the signals back (a process that goes on after train() must stay killable)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class Loop:
    """What the loop carries from step to step besides the run: logging, signals, NaN policy, timing."""

    tracker: object  # kimi.tracking.Tracker
    preempt: Preemption
    guard: NonFiniteGuard
    stop_after: int | None
    tokens_per_step: int
    flops_per_step: float
    peak_flops: float
    best_val: float = math.inf
    dt_ema: float | None = None


def forward_backward(run: Run, micro: list) -> torch.Tensor:
    """Forward and backward over this rank's micro-batches; the mean cross-entropy (device scalar)."""
    rt, engine = run.rt, run.engine
    loss_sum = torch.zeros((), device=rt.device)
    for i, (x, y) in enumerate(micro):
        x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
        with autocast(rt):
            out = engine.model(x, y)
        engine.backward(out.loss, i, len(micro))  # gradients reduced once, on the last micro-batch
        loss_sum += out.ce_loss.detach()
    return loss_sum / len(micro)


def train_step(run: Run, loop: Loop, step: int) -> tuple[dict, bool, list | None]:
    """One optimizer step: forward/backward, clip, agree across ranks, then update or skip. Returns
    (metrics row, whether a signal asks to stop after this step, this step's expert loads or None)."""
    rt, engine = run.rt, run.engine
    loss_t = forward_backward(run, run.batches.next_step())
    grad_norm_t = engine.clip_grad_norm()
    lr = engine.lr  # what this step uses
    # Before the update, one small all-reduce: the logged loss (mean over ranks), the preemption flag (any
    # rank) and whether the step is finite, so all ranks apply it or none does.
    flag = loop.preempt.signum is not None or step == loop.stop_after
    loss, grad_norm, stop, norm_ok = rt.agree_on_step(loss_t, grad_norm_t, flag)
    guard = loop.guard
    if guard.check(step, loss, grad_norm, norm_ok):  # raises NonFiniteError where the run must stop
        discard_update(run)
        qk, routing, t_opt = {}, {}, 0.0
        rt.print(f"step {step}: loss {loss:.4f}, grad norm {grad_norm:.4g}: update skipped "
                 f"({guard.in_a_row} in a row, {guard.total} in all; train.nonfinite=skip)")  # fmt: skip
    else:
        qk, routing, t_opt = apply_update(run, run.cfg.train.profile)
    row = {
        "step": step,
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "max_attn_logit": qk.get("max_logit", 0.0),
        "qk_clipped_heads": qk.get("clipped_heads", 0),
    }
    row.update({k: v for k, v in routing.items() if not k.startswith("_")})
    row.update(a2a_stats(run.raw_model))
    if guard.total:
        row["nonfinite_skips"] = guard.total  # steps skipped so far by this process
    if run.cfg.train.profile:
        row["optim_ms"] = 1000 * t_opt
    return row, stop, routing.get("_loads_LE")


def add_throughput(row: dict, loop: Loop, dt: float) -> None:
    row["tokens_per_s"] = loop.tokens_per_step / dt
    row["mfu"] = loop.flops_per_step / dt / loop.peak_flops if loop.peak_flops else 0.0
    row["step_time_s"] = dt


def eval_step(run: Run, loop: Loop, step: int, row: dict, loads_LE: list | None) -> None:
    """Validation loss into `row` (and the expert-load table to the tracker) on eval steps."""
    tcfg = run.cfg.train
    if run.val_set is None or not (step % tcfg.eval_interval == 0 or step == tcfg.max_steps):
        return
    row["val_loss"] = evaluate(run)
    row["val_ppl"] = math.exp(min(row["val_loss"], 20))
    loop.best_val = min(loop.best_val, row["val_loss"])
    if loads_LE is not None:
        moe_ids = [i for i in range(run.cfg.model.n_layer) if run.cfg.model.is_moe_layer(i)]
        loop.tracker.log_expert_load(step, [c.tolist() for c in loads_LE], layer_ids=moe_ids)


def log_row(run: Run, loop: Loop, step: int, row: dict) -> None:
    tcfg = run.cfg.train
    if step % tcfg.log_interval == 0 or "val_loss" in row or step == tcfg.max_steps:
        loop.tracker.log(step, row)
        run.rt.print(format_row(row, tcfg.max_steps, loop.dt_ema * (tcfg.max_steps - step)))


def save_step(run: Run, loop: Loop, step: int, row: dict, stop: bool) -> None:
    """The checkpoint at the end of the run, every ckpt_interval steps, and when a signal asks to stop."""
    tcfg = run.cfg.train
    if step == tcfg.max_steps or stop or (tcfg.ckpt_interval and step % tcfg.ckpt_interval == 0):
        tracker = loop.tracker
        meta = {
            "tokenizer": run.cfg.data.tokenizer_name,
            "val_loss": row.get("val_loss"),
            "mlflow_run_id": tracker.run_id,
        }
        save_checkpoint(run, step, meta, tracker.run_id)


def train(cfg: Config, stop_after: int | None = None) -> dict:
    """Runs the job described by `cfg`; returns the last metrics row (with `"preempted": True` when a
    signal stopped it). Collective under torchrun. `stop_after=k` behaves as if SIGUSR1 arrived during
    step k (tests use it to stop a run exactly where they want). Raises NonFiniteError where
    `train.nonfinite` ends the run (NaN/inf), leaving the checkpoints as they were."""
    from kimi.tracking import Tracker

    rt = setup_runtime(cfg)
    run = build(cfg, rt)
    for moe in run.raw_model.moe_layers():
        if hasattr(moe.dispatcher, "profile"):
            moe.dispatcher.profile = cfg.train.profile
    start_step, mlflow_run_id = restore(run)
    tcfg = cfg.train
    out_dir = Path(tcfg.out_dir)
    if rt.is_main:
        truncate_metrics(out_dir / "metrics.jsonl", start_step)
    tokens_per_step = tcfg.global_batch_size * cfg.block_size
    loop = Loop(
        tracker=Tracker(str(out_dir), cfg.logging, params=cfg.to_dict(), rank=rt.rank, resume_run_id=mlflow_run_id),
        preempt=Preemption(),
        guard=NonFiniteGuard(tcfg.nonfinite, tcfg.max_nonfinite_skips, hint=lambda: nonfinite_hint(run)),
        stop_after=stop_after,
        tokens_per_step=tokens_per_step,
        flops_per_step=run.raw_model.flops_per_token(cfg.block_size) * tokens_per_step,
        peak_flops=peak_flops(rt.device) * rt.world,
    )
    rt.print(
        f"training {run.raw_model.num_params() / 1e6:.2f}M params ({run.raw_model.num_active_params() / 1e6:.2f}M active) "
        f"on {rt.world} x {rt.device.type} ({run.engine.name}) | global batch {tcfg.global_batch_size} x "
        f"{cfg.block_size} tokens, micro {tcfg.micro_batch_size}, accumulation {run.batches.grad_accum} | "
        f"steps {start_step} -> {tcfg.max_steps}"
    )
    row: dict = {}
    status, exit_code, step = "FINISHED", 0, start_step
    t_start = time.perf_counter()
    try:
        for step in range(start_step + 1, tcfg.max_steps + 1):
            t0 = time.perf_counter()
            row, stop, loads_LE = train_step(run, loop, step)
            if rt.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            loop.dt_ema = dt if loop.dt_ema is None or step <= start_step + 2 else 0.9 * loop.dt_ema + 0.1 * dt
            add_throughput(row, loop, dt)
            eval_step(run, loop, step, row, loads_LE)
            log_row(run, loop, step, row)
            save_step(run, loop, step, row, stop)
            if stop and step < tcfg.max_steps:  # a signal during the last step: the run is complete anyway
                rt.print(
                    f"preempted (signal received): checkpoint at step {step} written, exiting with {REQUEUE_EXIT_CODE}"
                )
                status, exit_code = "KILLED", REQUEUE_EXIT_CODE
                break
    except BaseException:
        loop.tracker.finish("FAILED", config_yaml_text=cfg.to_yaml())
        raise
    finally:
        loop.preempt.restore()
    loop.tracker.finish(status, config_yaml_text=cfg.to_yaml())
    if status == "FINISHED":
        wall = time.perf_counter() - t_start
        rt.print(
            f"done: {step - start_step} steps in {wall:.0f}s | final loss {row.get('loss', float('nan')):.4f}"
            + (f" | best val {loop.best_val:.4f}" if loop.best_val < math.inf else "")
            + (f" | {loop.guard.total} non-finite step(s) skipped" if loop.guard.total else "")
            + f" | {out_dir}"
        )
    rt.shutdown()
    if exit_code:
        row["preempted"] = True
    return row


def truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop rows a killed run logged after its last checkpoint, so steps are not doubled."""
    if not path.exists():
        return
    import json

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


def format_row(row: dict, max_steps: int, eta_s: float) -> str:
    s = (
        f"step {row['step']:>5}/{max_steps} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | "
        f"gnorm {row['grad_norm']:.2f} | {row['tokens_per_s']:,.0f} tok/s | mfu {100 * row['mfu']:.1f}% | "
        f"max logit {row['max_attn_logit']:.1f}"
    )
    if "expert_imbalance" in row:
        s += f" | load max/mean {row['expert_imbalance']:.2f}"
    if "val_loss" in row:
        s += f" | val {row['val_loss']:.4f} (ppl {row['val_ppl']:.1f})"
    return s + f" | eta {format_time(eta_s)}"


def format_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="python -m kimi.train",
        description="Train a Kimi-K2-style MoE model (single process, or under torchrun: FSDP2 or DeepSpeed ZeRO-1/2, + EP).",
        epilog="Any config field can be overridden as --section.key=value, e.g. --moe.num_experts=16 "
        "--train.global_batch_size=64 --parallel.ep=2. Precedence: command line > YAML > defaults.",
    )
    p.add_argument("--config", help="YAML config (see configs/); defaults only when omitted")
    p.add_argument("--max-steps", type=int, help="shortcut for --train.max_steps")
    p.add_argument("--out-dir", help="shortcut for --train.out_dir (checkpoints, metrics.jsonl, mlflow.db)")
    p.add_argument("--resume", action="store_true", help="require resuming from OUT/checkpoints/latest")
    p.add_argument("--dry-run", action="store_true", help="build on the meta device, print sizes and memory, exit")
    return p.parse_known_args(argv)


def config_from_args(args: argparse.Namespace, overrides: list[str]) -> Config:
    extra = list(overrides)
    if args.max_steps is not None:
        extra.append(f"--train.max_steps={args.max_steps}")
    if args.out_dir is not None:
        extra.append(f"--train.out_dir={args.out_dir}")
    if args.resume:
        extra.append("--train.resume=true")
    return load_config(args.config, extra)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # its INFO lines (database creation) are noise here
    args, overrides = parse_args(argv)
    try:
        cfg = config_from_args(args, overrides)
        if args.dry_run:
            from kimi.dry_run import dry_run

            dry_run(cfg)
            return
        if train(cfg).get("preempted"):
            sys.exit(REQUEUE_EXIT_CODE)
    except NonFiniteError as e:
        if int(os.environ.get("RANK", "0")) == 0:  # every rank stops on it; one says so
            print(f"error: {e}", file=sys.stderr)
        sys.exit(NONFINITE_EXIT_CODE)
    except (ConfigError, UserError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except ValueError as e:  # bad input caught deep inside (data, tokens, layouts): still one line
        if os.environ.get("KIMI_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
