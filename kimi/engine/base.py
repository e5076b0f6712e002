"""The seam the training loop talks to: one small object that wraps the model and steps it.

    engine = build_engine(cfg, KimiModel(cfg.model).to(rt.device), rt)
    for i, (x, y) in enumerate(micro):
        with autocast(rt):
            out = engine.model(x, y)
        engine.backward(out.loss, i, len(micro))     # gradient sync only on the last micro-batch
    grad_norm_t = engine.clip_grad_norm()            # global norm before clipping, a device tensor
    ... the loop agrees across ranks whether the step is finite (one all-reduce) ...
    engine.step()   or   engine.skip()               # update + schedule + zero grads / schedule + zero grads
    engine.save(step, train_state, cfg.to_yaml(), meta)   /   train_state, meta = engine.load(engine.latest())

The loop's decision between step() and skip() comes after clip_grad_norm(), so a NaN/inf step is never
applied on any rank (kimi/nonfinite.py), whichever engine runs it.

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

from kimi.checkpoint import Checkpointer
from kimi.config import Config, ConfigError


class Engine(ABC):
    """What the loop needs from whatever distributes and steps the model.

    model      call it as model(x, y) -> ModelOutput; .train() / .eval(). Collective under EP/FSDP/ZeRO.
    raw_model  the KimiModel (moe_layers(), attention_layers(), flops_per_token(), ...)
    optimizer  the client optimizer (param_groups carry the lr the schedule sets)
    scheduler  the LambdaLR over it; its state goes into train_state
    ckpt       the Checkpointer: both engines share its atomic save/publish sequence around their `write`
    """

    name: str
    model: nn.Module
    raw_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ckpt: Checkpointer  # the atomic step directories under OUT/checkpoints (kimi/checkpoint.py)

    @abstractmethod
    def backward(self, loss: Tensor, micro: int, num_micro: int) -> None:
        """Backward of micro-batch `micro` of `num_micro` (its mean loss, unscaled): the engine divides by
        num_micro and reduces gradients across ranks once, on the last micro-batch."""

    @abstractmethod
    def clip_grad_norm(self) -> Tensor:
        """The global gradient norm before clipping, as a device scalar (same on every rank, inf/NaN when a
        gradient is not finite), with the gradients clipped to optim.grad_clip, now or inside step()."""

    @abstractmethod
    def step(self) -> None:
        """Apply the update: optimizer step on the clipped gradients, then the lr schedule; clear the gradients."""

    @abstractmethod
    def skip(self) -> None:
        """Drop this step's gradients: weights and optimizer state stay as they were; the lr schedule still
        advances (it stays tied to the step number)."""

    @abstractmethod
    def write(self, tmp: Path) -> None:
        """Collective: this rank's part of the model and optimizer state into the step directory `tmp`."""

    @abstractmethod
    def read(self, path: Path) -> None:
        """Collective: restore model and optimizer in place from a (verified) step directory."""

    def checkpoint_meta(self) -> dict[str, Any]:
        """What meta.json records about the engine's layout (checked by `read` where it must match)."""
        return {"engine": self.name}

    def save(self, step: int, train_state: dict[str, Any], config_yaml: str, meta: dict[str, Any]) -> Path:
        """Collective: an atomic checkpoint of model, optimizer, `train_state` (same on every rank), the
        config and `meta` under ckpt_dir/step_NNNNNN, then `latest` points to it. Returns the directory.
        kimi.checkpoint.Checkpointer does the atomic sequence (checksums, failure handling); `write` the rest."""
        return self.ckpt.save(step, self.write, train_state, config_yaml, {**meta, **self.checkpoint_meta()})

    def load(self, path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
        """Collective: restore model and optimizer from a checkpoint directory; returns (train_state, meta).
        A checkpoint of the other engine is refused in one line."""
        check_engine(path, self.name)
        return self.ckpt.load(path, self.read)

    def latest(self) -> Path | None:
        """The checkpoint to resume from under ckpt_dir (`latest`, else the newest complete step), or None."""
        return self.ckpt.latest()

    @property
    def ckpt_dir(self) -> Path:
        return self.ckpt.dir

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
