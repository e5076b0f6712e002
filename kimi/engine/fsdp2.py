"""The FSDP2 engine: today's pieces behind the Engine interface, called, not copied.

parallelize (EP -> activation checkpointing -> compile -> FSDP2), Muon/AdamW from kimi.optim, the
global-norm clip across meshes (Runtime.clip_grad_norm -> kimi.optim.grad_clip), and the DCP
Checkpointer (atomic step directories, resharding across world sizes and EP degrees).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from kimi.checkpoint import Checkpointer
from kimi.config import Config
from kimi.engine.base import Engine, check_engine


class FSDP2Engine(Engine):
    name = "fsdp2"

    def __init__(self, cfg: Config, model: nn.Module, rt):
        from kimi.optim import build_optimizer, build_scheduler
        from kimi.parallel import parallelize

        self.raw_model, self.rt, self.max_norm = model, rt, cfg.optim.grad_clip
        self.model = parallelize(model, rt.mesh, cfg.parallel, cfg.train)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.max_steps)
        self.ckpt = Checkpointer(Path(cfg.train.out_dir) / "checkpoints", cfg.train.keep_last, cfg.train.keep_best)
        self.ckpt_dir = self.ckpt.dir

    def backward(self, loss: Tensor, micro: int, num_micro: int) -> None:
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter once per step
            self.model.set_requires_gradient_sync(micro == num_micro - 1)
        (loss / num_micro).backward()

    def step(self) -> float:
        norm = self.rt.clip_grad_norm(self.model.parameters(), self.max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)  # clip_grad_norm returns a device tensor (no sync until here)

    def save(self, step: int, train_state: dict[str, Any], config_yaml: str, meta: dict[str, Any]) -> Path:
        return self.ckpt.save(step, self.model, self.optimizer, train_state, config_yaml, {**meta, "engine": self.name})

    def load(self, path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
        check_engine(path, self.name)
        return self.ckpt.load(path, self.model, self.optimizer)

    def latest(self) -> Path | None:
        return self.ckpt.latest()
