"""What the training loop does with a NaN/inf loss or gradient norm (`train.nonfinite`), and the check
that keeps non-finite weights out of checkpoints.

The loop learns whether a step is finite from the one small all-reduce it does anyway (loss, preemption
flag, grad-norm flag), before `optimizer.step`, so every rank takes the same decision and a bad step
never reaches the weights. `NonFiniteGuard.check` turns that decision into "apply", "skip" or
`NonFiniteError`, which `kimi.train` reports as one line with exit code `NONFINITE_EXIT_CODE`.
"""

from __future__ import annotations

import math

import torch

NONFINITE_EXIT_CODE = 4  # not 3 (requeue): resuming would replay the same steps into the same NaN


class NonFiniteError(RuntimeError):
    """The run stopped on NaN/inf: one line that says where, what, and what to try."""


class NonFiniteGuard:
    """Counts non-finite steps and applies the policy: "stop" at the first, "skip" up to `max_skips`
    in a row (a finite step resets the streak; `total` counts all skipped steps of the run). Both counters
    go into checkpoints (state_dict), so a restart neither resets the streak nor forgets the total."""

    def __init__(self, policy: str, max_skips: int):
        self.policy, self.max_skips = policy, max_skips
        self.in_a_row, self.total = 0, 0

    def state_dict(self) -> dict[str, int]:
        return {"in_a_row": self.in_a_row, "total": self.total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.in_a_row, self.total = int(state["in_a_row"]), int(state["total"])

    def check(self, step: int, loss: float, grad_norm: float, grad_norm_finite: bool) -> bool:
        """True if this step's update must be skipped; raises NonFiniteError when the run must stop (the
        trainer adds what to try and which checkpoint is good to its line)."""
        if math.isfinite(loss) and grad_norm_finite:
            self.in_a_row = 0
            return False
        what = (
            f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {grad_norm} (loss {loss:.4f})"
        )
        self.in_a_row += 1
        if self.policy == "skip" and self.in_a_row <= self.max_skips:
            self.total += 1
            return True
        if self.policy == "skip":
            what += f", {self.in_a_row} such steps in a row"
            why = f"train.max_nonfinite_skips={self.max_skips}"
        else:
            why = "train.nonfinite=stop"
        raise NonFiniteError(f"step {step}: {what}; stopped before applying it ({why}).")


@torch.no_grad()
def weights_finite(model: torch.nn.Module, all_reduce_max) -> bool:
    """Whether everything `model` saves (parameters, persistent buffers such as the router biases) is
    finite on every rank (a collective; for saves)."""
    bad = torch.zeros((), dtype=torch.float32)
    for t in model.state_dict().values():
        local = t.to_local() if hasattr(t, "to_local") else t
        if local.is_floating_point() and local.numel():
            bad = bad.to(local.device)
            bad = torch.maximum(bad, (~torch.isfinite(local)).any().float())
    return all_reduce_max(bad).item() == 0
