"""The trainer, written once: `python -m kimi.train`, alone or under torchrun.

    python -m kimi.train --config configs/nano.yaml [--max-steps N] [--out-dir DIR] [--resume]
                         [--section.key=value ...]
    torchrun --nproc_per_node=8 -m kimi.train --config configs/small.yaml --parallel.ep=8

Reads top-down: main() -> train() -> Trainer.train() -> train_step() -> forward_backward_step(). An
engine (kimi/engine/, `--parallel.engine=fsdp2|deepspeed`) wraps and steps the model and the trainer never
asks which one it has; the data stream is fixed by (seed, step) and sliced per rank, and the global batch
comes from the config, so any world size trains the same model.

Preemption: SIGTERM / SIGUSR1 finish the current step, write a checkpoint and exit with
REQUEUE_EXIT_CODE (3); a run whose out_dir already holds a checkpoint resumes from it (kimi.checkpoint).
NaN/inf: a step whose loss or gradient norm is not finite is never applied; `train.nonfinite` says
whether the run stops there (exit 4) or skips the step. Weights that hold NaN/inf are never saved.
A hung rank: a collective that waits longer than `parallel.timeout_s` ends every rank still running with
one line and exit 5 (kimi.trainer.hang); a restart resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from kimi.checkpoint import Checkpointer, CheckpointError
from kimi.config import Config, ConfigError, load_config, merge_dicts, parse_overrides, unflatten_dict
from kimi.config_help import config_help
from kimi.engine import build_engine, engine_class
from kimi.optim import warmup_note
from kimi.runtime import datasheet_peak_flops, setup_runtime
from kimi.trainer.console import StepLogger
from kimi.trainer.hang import HANG_EXIT_CODE, CollectiveTimeout, as_collective_timeout
from kimi.trainer.mixture_stats import MixtureStats
from kimi.trainer.nonfinite import NONFINITE_EXIT_CODE, NonFiniteError, NonFiniteGuard, weights_finite
from kimi.trainer.preemption import REQUEUE_EXIT_CODE, Preemption, clear_requeue_mark, mark_fatal, mark_requeue
from kimi.trainer.profiling import StepProfiler
from kimi.trainer.stats import RouterBias, a2a_stats, forget_step, max_logit_stats
from kimi.trainer.validator import Validator

__all__ = ["REQUEUE_EXIT_CODE", "Hooks", "Trainer", "UserError", "main", "train"]


class UserError(ValueError):
    """Bad input from the user: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------- entry point


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
        clear_requeue_mark()
        row = train(cfg)
        if row.get("preempted"):
            mark_requeue(row.get("step"))
            sys.exit(REQUEUE_EXIT_CODE)
    except CollectiveTimeout as e:
        # Every rank still running says so (the hung one may be rank 0). Then os._exit, skipping the
        # `finally` below: destroy_process_group and the interpreter's teardown (gloo's pair destructors,
        # atexit hooks) may wait on the hung peer's sockets, and an exit that can hang is the bug this fixes.
        # The metrics and the tracker were flushed by Trainer.train's own `finally` already.
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(HANG_EXIT_CODE)
    except NonFiniteError as e:
        if int(os.environ.get("RANK", "0")) == 0:  # every rank stops on it; one says so
            print(f"error: {e}", file=sys.stderr)
        mark_fatal(NONFINITE_EXIT_CODE, e)
        sys.exit(NONFINITE_EXIT_CODE)
    except (ConfigError, UserError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        mark_fatal(2, e)
        sys.exit(2)
    except ValueError as e:  # bad input caught deep inside (data, tokens, layouts): still one line
        if os.environ.get("KIMI_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        mark_fatal(2, e)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="python -m kimi.train",
        description="Train a Kimi-K2-style MoE model (one process, or under torchrun: FSDP2 or DeepSpeed ZeRO-1/2, + EP).",
        epilog="Every config field below can be set in the YAML or as --section.key=value (e.g. --moe.num_experts=16 "
        "--train.global_batch_size=64); precedence: command line > YAML > defaults.\n\n" + config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML config (see configs/); defaults only when omitted")
    p.add_argument("--max-steps", type=int, help="shortcut for --train.max_steps")
    p.add_argument("--out-dir", help="shortcut for --train.out_dir (checkpoints, metrics.jsonl, mlflow.db)")
    p.add_argument("--resume", action="store_true", help="require resuming from OUT/checkpoints/latest")
    p.add_argument(
        "--init-from-hf",
        metavar="DIR",
        help="start from a Hugging Face DeepSeek-V3 / Kimi-K2 folder: its config.json sets model.* (block_size "
        "stays the run's), each rank loads only its shards of the weights (FSDP2; train.init_from_hf)",
    )
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
    if not args.init_from_hf:
        return load_config(args.config, extra)
    from kimi.checkpoint.hf import model_fields_from_hf

    # YAML < the folder's config.json < command line
    hf = {
        "train.init_from_hf": args.init_from_hf,
        **{f"model.{k}": v for k, v in model_fields_from_hf(args.init_from_hf).items()},
    }
    return load_config(args.config, merge_dicts(unflatten_dict(hf), parse_overrides(extra)))


# ----------------------------------------------------------------------------- the job


@dataclass
class Hooks:
    """Where benchmarks, the Python API and tests reach into the real trainer (no one keeps a loop of their own).

    on_build(trainer)     once everything is built, before resuming (timers, fault injection)
    on_step(step, row)    after each step's metrics row is complete (curves, timings)
    """

    on_build: Callable[[Trainer], None] | None = None
    on_step: Callable[[int, dict], None] | None = None


def train(cfg: Config, stop_after: int | None = None, hooks: Hooks | None = None, **inject) -> dict:
    """Runs the job `cfg` describes; returns the last metrics row (with `"preempted": True` when a signal
    stopped it). Collective under torchrun. `stop_after=k` behaves as if SIGUSR1 arrived during step k.
    `inject` may pass `model`, `train_set`, `val_set` instead of building them from the config (the
    Python API). Raises NonFiniteError where `train.nonfinite` ends the run, checkpoints left as they were."""
    return Trainer(cfg, hooks, **inject).train(stop_after)


class Trainer:
    """Built once: runtime -> data -> model -> engine -> checkpointer -> validator; then train()."""

    def __init__(self, cfg: Config, hooks: Hooks | None = None, model=None, train_set=None, val_set=None):
        from kimi.data.dataset import BatchIterator
        from kimi.data.mixture import build_data
        from kimi.model import KimiModel
        from kimi.optim import QKClip

        t, m = cfg.train, cfg.model
        self.cfg, self.hooks = cfg, hooks or Hooks()
        check_out_dir(t.out_dir)  # before minutes of building: a bad path is one line, not a traceback
        if t.init_from_hf:
            from kimi.checkpoint.hf import check_model_matches_hf

            check_model_matches_hf(m, t.init_from_hf)
        self.rt = rt = setup_runtime(t, cfg.parallel, m, engine_class(cfg.parallel.engine).needs_process_group)
        data = (cfg.data, cfg.block_size, m.vocab_size, t.seed)
        if train_set is None:
            train_set = build_data(*data, split="train")
        if val_set is None and t.eval_interval > 0:
            val_set = build_data(*data, split="val")
        self.batches = BatchIterator(train_set, t.global_batch_size, t.micro_batch_size, rt.rank, rt.world)
        torch.manual_seed(t.seed)  # identical initial weights on every rank
        model = (KimiModel(m) if model is None else model).to(rt.device)
        # Counted before the engine wraps it, so every engine reports the same model: DeepSpeed keeps only this
        # rank's experts (plain (E/ep, F, D) tensors) where FSDP2's DTensors still count all of them.
        self.params = (model.num_params(), model.num_active_params(), model.flops_per_token(cfg.block_size))
        self.engine = build_engine(cfg, model, rt)
        self.raw_model = self.engine.raw_model
        self.qk_clip = None
        if cfg.optim.qk_clip:
            attn = self.raw_model.attention_layers()
            self.qk_clip = QKClip(attn, cfg.optim.qk_clip_tau, rt.all_reduce_max, self.engine.scale_rows_)
        self.router_bias = RouterBias(self.raw_model, rt.dp_group)
        self.engine.register_step_pre_hook(self.router_bias)  # the one place the router biases move
        self.guard = NonFiniteGuard(t.nonfinite, t.max_nonfinite_skips)
        states = {"scheduler": self.engine.schedule_state, "data": self.batches, "nonfinite": self.guard}
        self.checkpointer = Checkpointer(cfg, self.engine, states, say=rt.print, before_save=self._check_weights)
        self.validator = Validator(val_set, t, rt)
        self.phases: dict[str, float] = {}  # forward/backward/optimizer ms of this step (train.profile)
        self.mix = MixtureStats(train_set, t.global_batch_size) if hasattr(train_set, "source_counts") else None
        if self.hooks.on_build:
            self.hooks.on_build(self)

    def train(self, stop_after: int | None = None) -> dict:
        from kimi.tracking import Tracker
        from kimi.tracking.tracker import truncate_metrics, where_to_look

        cfg, rt, t = self.cfg, self.rt, self.cfg.train
        state = self.checkpointer.load()
        start = state["step"]
        if start == 0 and t.init_from_hf:
            self.init_from_hf(t.init_from_hf)
        if self.mix:
            self.mix.load(state)
        if self.batches.mixture_change:
            rt.print(self.batches.mixture_change)
        if start >= t.max_steps:
            rt.print(f"nothing to train: '{t.out_dir}' already holds step {start} of train.max_steps={t.max_steps}; "
                     "raise --max-steps to train further, or use another --out-dir")  # fmt: skip
            rt.shutdown()
            return {"step": start}
        if rt.is_main:
            truncate_metrics(Path(t.out_dir) / "metrics.jsonl", start)
        tracker = Tracker(t.out_dir, cfg.logging, cfg.to_dict(), rt.rank, resume_run_id=state.get("mlflow_run_id"))
        tokens = t.global_batch_size * cfg.block_size
        flops = self.params[2] * tokens
        self.logger = StepLogger(tracker, rt.print, t, tokens, flops, datasheet_peak_flops(rt.device) * rt.world, start)
        self.preempt = Preemption(stop_after)
        self.profiler = StepProfiler(t, rt.rank, rt.device, say=rt.print)
        rt.print(self.banner(start))
        if note := warmup_note(cfg.optim, t.max_steps):
            rt.print(note)
        if where := where_to_look(cfg.logging, t.out_dir):
            rt.print(where)
        row, status, step = {}, "FAILED", start
        try:
            for step in range(start + 1, t.max_steps + 1):
                with self.profiler.step(step):  # train.profile_steps: a torch.profiler trace of steps A..B
                    row, stop = self.train_step(step)
                row.update(self.validator.run(self.engine.model, step))
                self.log_expert_load(tracker, step, row)
                if self.mix:
                    self.mix.add(step)
                    row.update(self.mix.row() if self.logger.due(step, row) else {})
                self.logger.log(step, row)
                if self.hooks.on_step:
                    self.hooks.on_step(step, row)
                extra = {"mlflow_run_id": tracker.run_id, **(self.mix.state() if self.mix else {})}
                self.checkpointer.save(step, last=step == t.max_steps, force=stop, val_loss=row.get("val_loss"),
                                       extra=extra)  # fmt: skip
                if stop and step < t.max_steps:  # a signal during the last step: the run is complete anyway
                    rt.print(f"preempted (signal received): checkpoint at step {step} written, "
                             f"exiting with {REQUEUE_EXIT_CODE}")  # fmt: skip
                    status, row["preempted"] = "KILLED", True
                    break
            else:
                status = "FINISHED"
        except NonFiniteError as e:
            self.checkpointer.wait()  # a save still being written (train.async_checkpoint) becomes `latest` first
            raise NonFiniteError(f"{e} {self.nonfinite_hint()}") from None
        except RuntimeError as e:  # a rank that never joins a collective: gloo raises after parallel.timeout_s
            latest = self.checkpointer.latest()
            where = f"checkpoints/latest ({latest.name})" if latest else "the start (no checkpoint was written)"
            if hung := as_collective_timeout(e, rt.rank, step, cfg.parallel.timeout_s, where):
                raise hung from None
            raise
        finally:
            self.preempt.restore()
            self.profiler.close(tracker)
            tracker.finish(status, config_yaml_text=cfg.to_yaml())
            rt.release_group()  # a failed run too leaves no one-process group behind in this process
        if status == "FINISHED":
            rt.print(self.summary(step - start, row))
        rt.shutdown()
        return row

    def init_from_hf(self, hf_dir: str) -> None:
        """A fresh run's weights from an HF folder, each rank reading only what its shards hold."""
        from kimi.checkpoint.hf import load_hf_into

        t0 = time.perf_counter()
        self.hf_tensors_read = n = load_hf_into(self.raw_model, hf_dir, self.cfg.model)
        self.rt.print(f"initialised from {hf_dir}: {n} tensors read on rank 0 ({time.perf_counter() - t0:.1f}s)")

    def train_step(self, step: int) -> tuple[dict, bool]:
        """One optimizer step: forward/backward, grad norm, agree across ranks, then update or skip. Returns
        (metrics row, whether a signal asks to stop after this step)."""
        rt, engine, prof = self.rt, self.engine, self.cfg.train.profile
        t0 = time.perf_counter()
        self.phases = {}
        loss_t = self.forward_backward_step(self.batches.next_step())
        grad_norm_t = engine.grad_norm()
        lr = engine.lr  # what this step uses
        # Before the update, one small all-reduce: the logged loss (mean over ranks), the preemption flag (any
        # rank) and whether the step is finite, so all ranks apply it or none does.
        loss, grad_norm, stop, norm_ok = rt.agree_on_step(loss_t, grad_norm_t, self.preempt.requested(step))
        row = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm}
        if self.guard.check(step, loss, grad_norm, norm_ok):  # raises NonFiniteError where the run must stop
            engine.skip()
            forget_step(self.raw_model)
            self.router_bias.loads_LE, qk = None, {}
            g = self.guard
            rt.print(f"step {step}: loss {loss:.4f}, grad norm {grad_norm:.4g}: update skipped "
                     f"({g.in_a_row} in a row, {g.total} in all; train.nonfinite=skip)")  # fmt: skip
        else:
            t_opt = rt.sync_time() if prof else 0.0
            engine.step()  # the router-bias update runs first, as the engine's pre-step hook
            if prof:
                self.phases["optim_ms"] = 1000 * (rt.sync_time() - t_opt)
            qk = self.qk_clip.step() if self.qk_clip else max_logit_stats(self.raw_model, rt.all_reduce_max)
            row.update(self.router_bias.row())
        row["max_attn_logit"], row["qk_clipped_heads"] = qk.get("max_logit", 0.0), qk.get("clipped_heads", 0)
        row.update(a2a_stats(self.raw_model))
        if self.guard.total:
            row["nonfinite_skips"] = self.guard.total  # steps skipped so far in the run (resumes included)
        row.update(self.phases)
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        self.logger.add_throughput(row, step, time.perf_counter() - t0)
        return row, stop

    def forward_backward_step(self, micro: list) -> torch.Tensor:
        """Forward and backward over this rank's micro-batches; the mean cross-entropy (device scalar)."""
        rt, engine, prof = self.rt, self.engine, self.cfg.train.profile
        loss_sum = torch.zeros((), device=rt.device)
        for i, (x, y) in enumerate(micro):
            x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
            ta = rt.sync_time() if prof else 0.0
            with rt.autocast():
                out = engine.model(x, y)
            tb = rt.sync_time() if prof else 0.0
            engine.backward(out.loss, i, len(micro))  # gradients reduced once, on the last micro-batch
            if prof:
                tc = rt.sync_time()
                self.phases["forward_ms"] = self.phases.get("forward_ms", 0.0) + 1000 * (tb - ta)
                self.phases["backward_ms"] = self.phases.get("backward_ms", 0.0) + 1000 * (tc - tb)
            loss_sum += out.ce_loss.detach()
        return loss_sum / len(micro)

    # ------------------------------------------------------------------ around the steps

    def log_expert_load(self, tracker, step: int, row: dict) -> None:
        """The (layers x experts) load table, on eval steps."""
        loads = self.router_bias.loads_LE
        if "val_loss" in row and loads is not None:
            ids = [i for i in range(self.cfg.model.n_layer) if self.cfg.model.is_moe_layer(i)]
            tracker.log_expert_load(step, [c.tolist() for c in loads], layer_ids=ids)

    def _check_weights(self, step: int) -> None:
        """Before a save: weights that hold NaN/inf never replace the last good checkpoint."""
        if not weights_finite(self.engine.model, self.rt.all_reduce_max):
            raise NonFiniteError(f"step {step}: the weights hold NaN/inf, not saving them.")

    def nonfinite_hint(self) -> str:
        """The end of the line that stops a run on NaN/inf: what to try, and which checkpoint is good."""
        latest = self.checkpointer.latest()
        where = f"checkpoints/latest is still {latest.name}" if latest else "no checkpoint was written"
        skip = ", or --train.nonfinite=skip to drop such steps" if self.cfg.train.nonfinite == "stop" else ""
        return f"Try a lower --optim.lr (now {self.cfg.optim.lr:g}) or check the data{skip}; {where}."

    def banner(self, start: int) -> str:
        (total, active, _), t, rt = self.params, self.cfg.train, self.rt
        return (
            f"training {total / 1e6:.2f}M params ({active / 1e6:.2f}M active) on "
            f"{rt.world} x {rt.device.type} ({self.engine.name}) | global batch {t.global_batch_size} x "
            f"{self.cfg.block_size} tokens, micro {t.micro_batch_size}, accumulation {self.batches.grad_accum} | "
            f"steps {start} -> {t.max_steps}"
        )

    def summary(self, steps: int, row: dict) -> str:
        best = self.validator.best
        return (
            f"done: {steps} steps in {self.logger.elapsed():.0f}s | final loss {row['loss']:.4f}"
            + (f" | best val {best:.4f}" if best < float("inf") else "")
            + (f" | {self.guard.total} non-finite step(s) skipped" if self.guard.total else "")
            + f" | {self.cfg.train.out_dir}"
        )


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


if __name__ == "__main__":
    main()
