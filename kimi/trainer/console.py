"""The trainer's console: one readable line per logged step, and when to log.

    step    10/200 | loss 5.1234 | lr 3.00e-03 | gnorm 0.91 | 1,234 tok/s | max logit 12.3 | load max/mean 1.20 | eta 3m10s

MFU is printed on GPUs only, against the card's datasheet bf16 peak: a CPU has no such figure (a
guessed one read 45-52%), and `python -m kimi.bench throughput` measures MFU against a measured matmul
peak on any device.
"""

from __future__ import annotations

import time


class StepLogger:
    """Decides which steps are logged (the first one, every log_interval, eval steps and the last), adds
    throughput to the row, and sends it to the tracker and the console."""

    def __init__(self, tracker, say, train_cfg, tokens_per_step: int, flops_per_step: float, peak_flops: float,
                 start_step: int) -> None:  # fmt: skip
        self.tracker, self.say, self.cfg = tracker, say, train_cfg
        self.tokens_per_step, self.flops_per_step, self.peak_flops = tokens_per_step, flops_per_step, peak_flops
        self.start_step, self.dt_ema = start_step, None
        self.t_start = time.perf_counter()

    def add_throughput(self, row: dict, step: int, dt: float) -> None:
        early = self.dt_ema is None or step <= self.start_step + 2  # the first steps pay for warm-up
        self.dt_ema = dt if early else 0.9 * self.dt_ema + 0.1 * dt
        row["tokens_per_s"] = self.tokens_per_step / dt
        if self.peak_flops:
            row["mfu"] = self.flops_per_step / dt / self.peak_flops
        row["step_time_s"] = dt

    def due(self, step: int, row: dict) -> bool:
        t = self.cfg
        return step % t.log_interval == 0 or step == self.start_step + 1 or "val_loss" in row or step == t.max_steps

    def log(self, step: int, row: dict) -> None:
        if self.due(step, row):
            self.tracker.log(step, row)
            eta = (self.dt_ema or 0.0) * (self.cfg.max_steps - step)
            self.say(format_row(row, self.cfg.max_steps, eta))

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start


def format_row(row: dict, max_steps: int, eta_s: float) -> str:
    s = (
        f"step {row['step']:>5}/{max_steps} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | "
        f"gnorm {row['grad_norm']:.2f} | {row['tokens_per_s']:,.0f} tok/s | "
    )
    if "mfu" in row:
        s += f"mfu {100 * row['mfu']:.1f}% | "
    s += f"max logit {row['max_attn_logit']:.1f}"
    if "expert_imbalance" in row:
        s += f" | load max/mean {row['expert_imbalance']:.2f}"
    if "val_loss" in row:
        s += f" | val {row['val_loss']:.4f} (ppl {row['val_ppl']:.1f})"
    return s + f" | eta {format_time(eta_s)}"


def format_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
