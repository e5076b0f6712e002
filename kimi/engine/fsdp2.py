"""The FSDP2 engine: kimi.parallel (EP -> activation checkpointing -> compile -> FSDP2), Muon/AdamW from
kimi.optim, the global-norm clip across meshes (kimi.optim.grad_clip), and DCP checkpoints (synchronous,
or `dcp.async_save` under train.async_checkpoint).

Checkpoint format: torch.distributed.checkpoint shards of {"model", "optim"} in the step directory. DCP
stores tensors by fully-qualified name with their global shapes, so a checkpoint written at world size 2
and EP 2 loads at world size 1, 4 or EP 1: each loader asks for the slices its own layout needs.
"""

from __future__ import annotations

import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse

from kimi.checkpoint import CheckpointError
from kimi.checkpoint.store import pause_in_write
from kimi.config import OptimConfig, ParallelConfig, TrainConfig
from kimi.engine.base import Engine

# DCP warns on every save and load in one process without a process group (world size 1, where that is
# what we mean). Filtered for the whole process: the async writer's thread warns too, out of reach of a
# catch_warnings block.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


class FSDP2Engine(Engine):
    name = "fsdp2"

    def __init__(self, model: nn.Module, rt, optim: OptimConfig, parallel: ParallelConfig, train: TrainConfig):
        from kimi.optim import ScheduleState, build_optimizer, build_scheduler
        from kimi.parallel import parallelize

        self.raw_model, self.max_norm = model, optim.grad_clip
        self.model = parallelize(model, rt.mesh, parallel, train)
        self._optimizer = build_optimizer(self.model, optim)
        self._scheduler = build_scheduler(self._optimizer, optim, train.max_steps)
        self.schedule_state = ScheduleState(self._optimizer, self._scheduler)
        self._params = list(self.model.parameters())
        self._norm: Tensor | None = None
        self._stager: DefaultStager | None = None  # train.async_checkpoint: the host copy, kept between saves

    def backward(self, loss: Tensor, micro: int, num_micro: int) -> None:
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter once per step
            self.model.set_requires_gradient_sync(micro == num_micro - 1)
        (loss / num_micro).backward()

    def grad_norm(self) -> Tensor:
        from kimi.optim import grad_norm

        self._norm = grad_norm(self._params)
        return self._norm

    def step(self) -> None:
        from kimi.optim import clip_grads_, grad_norm

        norm = self._norm if self._norm is not None else grad_norm(self._params)
        clip_grads_(self._params, self.max_norm, norm)
        self._optimizer.step()
        self.skip()

    def skip(self) -> None:
        self._norm = None
        self._scheduler.step()
        self._optimizer.zero_grad(set_to_none=True)

    def write(self, tmp: Path) -> None:
        """This rank's DCP shards of {"model", "optim"}."""
        model_sd, optim_sd = get_state_dict(self.model, self._optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=_Writer(tmp))

    def write_async(self, tmp: Path, group: Any) -> Future:
        """The same shards through `dcp.async_save`: returns once they are staged (copied to host memory,
        so the next step may change the weights), with a Future that completes when they are on disk.
        DCP's default thread executor (not its process one: a process per rank would hold a second copy of
        the interpreter and a process group of its own for little gain at this size); its collectives go
        over `group`, a gloo group apart from the training step's.

        One stager for the run: it keeps its host copy between saves and copies into it, where a fresh one
        would allocate (and page-fault) the whole state again each time, which on CPU took as long as the
        copy itself. The cost: that copy stays allocated for the run. Safe to reuse because the store
        finishes a save before it stages the next."""
        if self._stager is None:
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=torch.cuda.is_available(),
                                                        use_shared_memory=False, use_async_staging=False,
                                                        use_non_blocking_copy=False))  # fmt: skip
        model_sd, optim_sd = get_state_dict(self.model, self._optimizer)
        written = dcp.async_save(
            {"model": model_sd, "optim": optim_sd},
            storage_writer=_Writer(tmp),
            process_group=group,
            async_stager=self._stager,
        )
        return written.upload_completion if isinstance(written, AsyncSaveResponse) else written

    def read(self, path: Path) -> None:
        """Restore model and optimizer in place from DCP shards, at any world size or EP degree."""
        model_sd, optim_sd = get_state_dict(self.model, self._optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        check_shapes(path, {"model": model_sd})
        _dcp_load(state, path)
        set_state_dict(self.model, self._optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


ENGINE = FSDP2Engine


class _Writer(dcp.FileSystemWriter):
    """DCP's file writer, with the fault tests' hook once this rank's shards are on disk (its `.metadata`
    index, written by rank 0 after every rank's shards, is not yet): a no-op unless the test sets it."""

    def write_data(self, plan, planner):
        done = super().write_data(plan, planner)
        pause_in_write(Path(self.path))
        return done


def read_model_state(path: Path, cfg_dict: dict[str, Any]) -> dict[str, Tensor]:
    """The full model state dict of an FSDP2 (DCP) step directory, on one process."""
    from kimi.config import config_from_dict
    from kimi.model import KimiModel

    cfg = config_from_dict(cfg_dict)
    with torch.device("meta"):
        model = KimiModel(cfg.model)
    model = model.to_empty(device="cpu")
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=False))
    _dcp_load({"model": sd}, path)
    return sd


def check_shapes(path: Path, state: dict[str, Any]) -> None:
    """Compare the tensors we are about to load with the checkpoint's metadata: one clear line on mismatch."""
    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    for section, sd in state.items():
        for key, t in sd.items():
            fqn = f"{section}.{key}"
            if not isinstance(t, torch.Tensor):
                continue
            if fqn not in meta:
                raise CheckpointError(
                    f"checkpoint '{path}' has no tensor '{key}'; was it written with a different config?"
                )
            saved = tuple(getattr(meta[fqn], "size", ()))
            if saved != tuple(t.shape):
                raise CheckpointError(
                    f"checkpoint '{path}' does not fit this model: '{key}' is {list(saved)} there and "
                    f"{list(t.shape)} here; was it written with a different config?"
                )


def _dcp_load(state: dict[str, Any], path: Path) -> None:
    try:
        dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as e:  # CheckpointException derives from BaseException
        first = str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"cannot load checkpoint '{path}': {first}; was it written with a different config?"
        ) from None


def memory_estimate(sizes: dict, dims, parallel) -> dict[str, float]:
    """Per-GPU bytes under FSDP2 (for --dry-run; kimi/dry_run.py has the sizes). Every weight is sharded
    over dp_shard (experts over ep inside it) in fp32, 4 B; gradients the same shards (reduced in fp32);
    Muon keeps one fp32 buffer per element, AdamW two. Inside a step the largest block is all-gathered in
    the working dtype (bf16 on GPU), and the root's (embedding, head) stays gathered through forward and
    backward (reshard_after_forward=False, kimi/parallel/fsdp.py): `buffers` (backward prefetch may hold one
    more block). Measured on gloo CPU ranks (docs/training.md): the three states are exact to padding at
    world 1 to 8."""
    shard = dims.dp_shard
    block = sizes["block_params"] - sizes["block_expert"] + sizes["block_expert"] / max(1, dims.ep)
    total, muon = sizes["total"], sizes["muon"]
    return {
        "params": total / shard * 4,
        "grads": total / shard * 4,
        "optim": (muon * 4 + (total - muon) * 8) / shard,
        "buffers": (sizes["root_params"] + block) * sizes["working_bytes"],
        "activations": sizes["activations"],
    }
