"""The FSDP2 engine: today's pieces behind the Engine interface, called, not copied.

parallelize (EP -> activation checkpointing -> compile -> FSDP2), Muon/AdamW from kimi.optim, the
global-norm clip across meshes (Runtime.clip_grad_norm -> kimi.optim.grad_clip), and the DCP
Checkpointer (atomic step directories, resharding across world sizes and EP degrees).
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from kimi.checkpoint import Checkpointer, dcp_read, dcp_write
from kimi.config import Config
from kimi.engine.base import Engine


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

    def backward(self, loss: Tensor, micro: int, num_micro: int) -> None:
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter once per step
            self.model.set_requires_gradient_sync(micro == num_micro - 1)
        (loss / num_micro).backward()

    def clip_grad_norm(self) -> Tensor:
        return self.rt.clip_grad_norm(self.model.parameters(), self.max_norm)

    def step(self) -> None:
        self.optimizer.step()
        self.skip()

    def skip(self) -> None:
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def write(self, tmp: Path) -> None:
        dcp_write(tmp, self.model, self.optimizer)

    def read(self, path: Path) -> None:
        dcp_read(path, self.model, self.optimizer)
