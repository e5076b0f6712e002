"""Learning-rate schedules as multipliers of each param group's base lr (torch LambdaLR, so the
scheduler's position is checkpointed with its state_dict; the shape itself comes from the config).

Step s is the number of optimizer steps already taken; optimizer step s runs at lr * lr_lambda(s).
  warmup     s < warmup_steps: (s + 1) / warmup_steps, reaching 1 on the last warmup step
  cosine     then half a cosine from 1 down to min_lr_ratio at s = max_steps
  wsd        then 1 (stable) until the last decay_fraction of max_steps, then LINEAR decay to min_lr_ratio
             at s = max_steps (Kimi K2 / MiniCPM's warmup-stable-decay; linear is the simplest decay and
             the one we test; the decay never starts before warmup ends)
  constant   then 1
"""

from __future__ import annotations

import math

import torch

from kimi.config import ConfigError, OptimConfig


def _check(cfg: OptimConfig, max_steps: int) -> None:
    cfg.validate()
    if max_steps < 1:
        raise ConfigError(f"train.max_steps={max_steps} must be >= 1 for an lr schedule")
    if cfg.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps={cfg.warmup_steps} must be >= 0")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio={cfg.min_lr_ratio} must be in [0, 1]")
    if not 0.0 <= cfg.decay_fraction <= 1.0:
        raise ConfigError(f"optim.decay_fraction={cfg.decay_fraction} must be in [0, 1]")


def warmup_note(cfg: OptimConfig, max_steps: int) -> str | None:
    """One line when the warmup outlasts the run (the lr never reaches cfg.lr), else None. Said, not refused:
    a short smoke run of a real config (nano's 100-step warmup, `--train.max_steps=5`) is a normal thing to do."""
    if not 0 < max_steps < cfg.warmup_steps:
        return None
    return (
        f"note: optim.warmup_steps={cfg.warmup_steps} > train.max_steps={max_steps}: the lr peaks at "
        f"{max_steps / cfg.warmup_steps:.0%} of optim.lr={cfg.lr:g}; lower --optim.warmup_steps if that is not meant"
    )


def lr_lambda(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """The lr multiplier for optimizer step `step` (0-based) of a `max_steps`-step run."""
    w, lo = cfg.warmup_steps, cfg.min_lr_ratio
    if step < w:
        return (step + 1) / w
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - w) / max(1, max_steps - w))
        return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "wsd":
        decay_start = max(w, max_steps - round(cfg.decay_fraction * max_steps))
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
        return 1.0 - (1.0 - lo) * progress
    raise ConfigError(f"optim.schedule={cfg.schedule!r} is not one of 'cosine', 'wsd', 'constant'")


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over every param group. Call scheduler.step() once after each optimizer.step()."""
    _check(cfg, max_steps)

    def fn(step: int) -> float:  # a plain function: LambdaLR's state_dict stores the position, not the shape
        return lr_lambda(step, cfg, max_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


class ScheduleState:
    """The lr schedule's position as a checkpointable state (`state_dict` / `load_state_dict`).

    Loading keeps THIS run's hyperparameters: the optimizer's param groups come back from a checkpoint
    with the old run's lr, weight decay, betas and base lrs; they are put back to the values captured
    here at build time, and each group's lr is recomputed from the restored position (so the schedule
    also follows a new max_steps). Load it after the optimizer's own state."""

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR):
        self.optimizer, self.scheduler = optimizer, scheduler
        self._hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        self._base_lrs = list(scheduler.base_lrs)

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        sched = self.scheduler
        sched.load_state_dict(state)
        sched.base_lrs = list(self._base_lrs)
        for group, h, base, fn in zip(self.optimizer.param_groups, self._hyper, self._base_lrs, sched.lr_lambdas):
            group.update(h)
            group["lr"] = base * fn(sched.last_epoch)
