"""The seam the training loop talks to: one small object that wraps the model and steps it.

    engine = build_engine(cfg, KimiModel(cfg.model).to(rt.device), rt)
    for i, (x, y) in enumerate(micro):
        with autocast(rt):
            out = engine.model(x, y)
        engine.backward(out.loss, i, len(micro))     # gradient sync only on the last micro-batch
    grad_norm = engine.step()                        # clip, optimizer step, lr schedule, zero grads
    engine.save(step, train_state, cfg.to_yaml(), meta)   /   train_state, meta = engine.load(engine.latest())

Two implementations: `fsdp2` (kimi.parallel: EP + FSDP2, Muon/AdamW from kimi.optim, DCP checkpoints)
and `deepspeed` (the same EP, then ZeRO-1/2 with the same optimizer as its client). The model is the
same single-device KimiModel in both; nothing engine-specific goes into it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kimi.config import Config, ConfigError


class Engine(ABC):
    """What the loop needs from whatever distributes and steps the model.

    model      call it as model(x, y) -> ModelOutput; .train() / .eval(). Collective under EP/FSDP/ZeRO.
    raw_model  the KimiModel (moe_layers(), attention_layers(), flops_per_token(), ...)
    optimizer  the client optimizer (param_groups carry the lr the schedule sets)
    scheduler  the LambdaLR over it; its state goes into train_state
    """

    name: str
    model: nn.Module
    raw_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ckpt_dir: Path

    @abstractmethod
    def backward(self, loss: Tensor, micro: int, num_micro: int) -> None:
        """Backward of micro-batch `micro` of `num_micro` (its mean loss, unscaled): the engine divides by
        num_micro and reduces gradients across ranks once, on the last micro-batch."""

    @abstractmethod
    def step(self) -> float:
        """Clip gradients to the configured global norm, step the optimizer, then the lr schedule, and
        clear the gradients. Returns the global gradient norm before clipping (same on every rank)."""

    @abstractmethod
    def save(self, step: int, train_state: dict[str, Any], config_yaml: str, meta: dict[str, Any]) -> Path:
        """Collective: an atomic checkpoint of model, optimizer, `train_state` (same on every rank), the
        config and `meta` under ckpt_dir/step_NNNNNN, then `latest` points to it. Returns the directory."""

    @abstractmethod
    def load(self, path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
        """Collective: restore model and optimizer from a checkpoint directory; returns (train_state, meta)."""

    @abstractmethod
    def latest(self) -> Path | None:
        """The checkpoint `latest` points to under ckpt_dir, or None."""

    def scale_rows_(self, p: Tensor, scale: Tensor) -> None:
        """p[i] *= scale[i] (QK-clip's edit of q/k weights after a step, `QKClip(scale_fn=...)`), applied
        wherever the engine keeps the weights it steps."""
        from kimi.optim.qk_clip import scale_rows_

        scale_rows_(p, scale)

    @property
    def lr(self) -> float:
        """The lr the next step() uses (of the first param group)."""
        return self.optimizer.param_groups[0]["lr"]


def build_engine(cfg: Config, model: nn.Module, rt) -> Engine:
    """The engine `cfg.parallel.engine` names, wrapping `model` (a KimiModel on rt.device, the same weights on
    every rank) on the runtime `rt` (kimi.runtime.Runtime: device, mesh, process group)."""
    if cfg.parallel.engine == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise ConfigError("parallel.engine=deepspeed needs DeepSpeed: pip install -e '.[deepspeed]'") from None
        from kimi.engine.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg, model, rt)
    from kimi.engine.fsdp2 import FSDP2Engine

    return FSDP2Engine(cfg, model, rt)


def check_engine(path: str | Path, engine: str) -> None:
    """One clear line when a checkpoint was written by the other engine (their layouts differ)."""
    from kimi.checkpoint import CheckpointError, read_meta

    wrote = read_meta(path).get("engine", "fsdp2")  # checkpoints from before engines existed are FSDP2's
    if wrote != engine:
        raise CheckpointError(
            f"checkpoint '{path}' was written by the {wrote} engine; resume it with --parallel.engine={wrote}"
        )
