"""The seam the trainer talks to: one small object that wraps the model and steps it.

    engine = build_engine(cfg, KimiModel(cfg.model).to(rt.device), rt)      # kimi/engine/__init__.py
    for i, (x, y) in enumerate(micro):
        with rt.autocast():
            out = engine.model(x, y)
        engine.backward(out.loss, i, len(micro))     # gradient sync only on the last micro-batch
    grad_norm_t = engine.grad_norm()                 # global norm, a device tensor; nothing clipped yet
    ... the trainer agrees across ranks whether the step is finite (one all-reduce) ...
    engine.step()   or   engine.skip()               # clip + update + schedule + zero grads / schedule + zero grads

Checkpoints: kimi.checkpoint.Checkpointer calls `write(tmp)` / `read(step_dir)` inside its atomic
sequence, and stores `checkpoint_meta()`; the lr schedule's position is `schedule_state` (a Stateful).
Hooks that must run right before every applied update (the router-bias update) are registered with
`register_step_pre_hook`: they fire once on each `step()`, never on `skip()`.

An engine lives in one file, kimi/engine/<name>.py, with all it knows: wrapping, the backward / clip /
step semantics, its checkpoint format (write, read, and `read_model_state` for one process), its memory
model for the dry run, and whether it needs a process group at world size 1. Adding one touches that
file and the registry in kimi/engine/__init__.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


class Engine(ABC):
    """What the trainer needs from whatever distributes and steps the model.

    model           call it as model(x, y) -> ModelOutput; .train() / .eval(). Collective under EP/FSDP/ZeRO.
    raw_model       the KimiModel (moe_layers(), attention_layers(), flops_per_token(), ...)
    schedule_state  the lr schedule's position (state_dict / load_state_dict; this run's hyperparameters hold)
    """

    name: str
    needs_process_group: bool = False  # True: the runtime creates a one-process group at world size 1
    model: nn.Module
    raw_model: nn.Module
    schedule_state: Any
    _optimizer: torch.optim.Optimizer  # the client optimizer: param_groups carry the lr the schedule sets

    @abstractmethod
    def backward(self, loss: Tensor, micro: int, num_micro: int) -> None:
        """Backward of micro-batch `micro` of `num_micro` (its mean loss, unscaled): the engine divides by
        num_micro and reduces gradients across ranks once, on the last micro-batch."""

    @abstractmethod
    def grad_norm(self) -> Tensor:
        """The global gradient norm, as a device scalar (the same on every rank; inf/NaN when a gradient is
        not finite). Nothing is clipped here: step() clips to optim.grad_clip, in every engine."""

    @abstractmethod
    def step(self) -> None:
        """Apply the update: clip, optimizer step (pre-step hooks first), then the lr schedule; clear the
        gradients."""

    @abstractmethod
    def skip(self) -> None:
        """Drop this step's gradients: weights, optimizer state and pre-step hooks untouched; the lr schedule
        still advances (it stays tied to the step number)."""

    @abstractmethod
    def write(self, tmp: Path) -> None:
        """Collective: this rank's part of the model and optimizer state into the step directory `tmp`."""

    def write_async(self, tmp: Path, group: Any) -> Future:
        """Collective: `write` that returns once this rank's state is staged (copied, so training may go
        on), with a Future that completes when it is on disk; collectives over `group`
        (train.async_checkpoint). An engine without it is named in Config.validate, which refuses
        async_checkpoint for it in one line."""
        raise NotImplementedError(f"the {self.name} engine writes checkpoints synchronously")

    @abstractmethod
    def read(self, path: Path) -> None:
        """Collective: restore model and optimizer in place from a (verified) step directory."""

    def checkpoint_meta(self) -> dict[str, Any]:
        """What meta.json records about the engine's layout (`engine` is checked on resume)."""
        return {"engine": self.name}

    def register_step_pre_hook(self, hook: Callable[[], None]) -> None:
        """`hook()` runs once right before each applied optimizer update (on every rank), never on skip().

        Here: a pre-step hook on the optimizer, right for an engine that calls its step() once per update
        (FSDP2). An engine whose optimizer is stepped several times per update overrides this (DeepSpeed:
        ZeRO steps the client optimizer once per param group)."""
        self._optimizer.register_step_pre_hook(lambda opt, args, kwargs: hook())

    def scale_rows_(self, p: Tensor, scale: Tensor) -> None:
        """p[i] *= scale[i] (QK-clip's edit of q/k weights after a step, `QKClip(scale_fn=...)`), applied
        wherever the engine keeps the weights it steps."""
        from kimi.optim.qk_clip import scale_rows_

        scale_rows_(p, scale)

    @property
    def lr(self) -> float:
        """The lr the next step() uses (of the first param group)."""
        return self._optimizer.param_groups[0]["lr"]
