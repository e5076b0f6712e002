"""Checkpoints: sharded (torch.distributed.checkpoint), atomic, resumable at any world size.

Layout, one directory per step:

    OUT/checkpoints/step_000400/   DCP shards of {"model", "optim"}, train_state.pt (scheduler, data
                                   position, QK-clip/routing extras), rng/rank_00000.pt ...,
                                   config.yaml, meta.json (step, tokenizer, git commit, world size, ...)
    OUT/checkpoints/latest         symlink -> step_000400, replaced only once the step directory is complete
    OUT/checkpoints/best           symlink -> the step with the lowest validation loss (kept from rotation)

Atomicity: every rank writes into `step_000400.tmp/`; after a barrier rank 0 renames it to
`step_000400/` (a POSIX rename of a directory is atomic) and then swaps the `latest` symlink with
`os.replace`. A kill at any moment leaves either the old `latest` or the new one, never a half
checkpoint behind a pointer. Leftover `*.tmp` directories are removed at the next save.

DCP stores tensors by fully-qualified name with their global shapes, so a checkpoint written with
FSDP2 at world size 2 and EP 2 loads at world size 1, 4 or EP 1: each loader asks for the slices its
own layout needs.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from kimi.tracking.system import git_state  # provenance (commit, dirty) lives with tracking

STEP_PREFIX = "step_"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with a line saying why."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def resolve(path: str | Path) -> Path:
    """A checkpoint path given by a user: a step directory, a `latest`/`best` link, an `OUT/checkpoints`
    directory or a run's `OUT` directory (both meaning its latest step)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    if p.is_dir() and not (p / "meta.json").exists():
        for cand in (p / "latest", p / "checkpoints" / "latest"):
            if cand.exists():
                return cand.resolve()
        raise CheckpointError(f"'{path}' holds no checkpoint (no meta.json, no latest link)")
    return p.resolve()


def read_meta(path: str | Path) -> dict[str, Any]:
    return json.loads((resolve(path) / "meta.json").read_text())


class Checkpointer:
    """Saves and restores a training run's full state under `ckpt_dir`."""

    def __init__(self, ckpt_dir: str | Path, keep_last: int = 2, keep_best: bool = True):
        self.dir = Path(ckpt_dir)
        self.keep_last = max(1, keep_last)
        self.keep_best = keep_best

    # ------------------------------------------------------------------ queries
    def latest(self) -> Path | None:
        link = self.dir / "latest"
        return link.resolve() if link.exists() else None

    def _steps(self) -> list[Path]:
        return sorted(p for p in self.dir.glob(f"{STEP_PREFIX}*") if p.is_dir() and not p.name.endswith(".tmp"))

    # ------------------------------------------------------------------ save
    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        train_state: dict[str, Any],
        config_yaml: str,
        meta: dict[str, Any],
    ) -> Path:
        """Collective: every rank calls it. `train_state` (scheduler, data position, ...) must be the
        same on all ranks; rank 0 writes it. Returns the final step directory."""
        name = f"{STEP_PREFIX}{step:06d}"
        final, tmp = self.dir / name, self.dir / f"{name}.tmp"
        rank = _rank()
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob("*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        _barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
        if rank == 0:
            commit, dirty = git_state(Path(__file__).resolve().parent)
            torch.save(train_state, tmp / "train_state.pt")
            (tmp / "config.yaml").write_text(config_yaml)
            meta = {
                **meta,
                "step": step,
                "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "git_commit": commit or "unknown",
                "git_dirty": dirty,
                "torch": torch.__version__,
                "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        _barrier()
        if rank == 0:
            if final.exists():  # re-saving a step (e.g. preempted right after a periodic save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._point("latest", final)
            val = meta.get("val_loss")
            if self.keep_best and val is not None and val < self._best_val():
                self._point("best", final)
            self._rotate()
        _barrier()
        return final

    def _point(self, link_name: str, target: Path) -> None:
        tmp_link = self.dir / f".{link_name}.new"
        if tmp_link.is_symlink() or tmp_link.exists():
            tmp_link.unlink()
        os.symlink(target.name, tmp_link)
        os.replace(tmp_link, self.dir / link_name)

    def _best_val(self) -> float:
        best = self.dir / "best"
        if not best.exists():
            return float("inf")
        return json.loads((best / "meta.json").read_text()).get("val_loss", float("inf"))

    def _rotate(self) -> None:
        keep = {p.resolve() for p in (self.dir / "latest", self.dir / "best") if p.exists()}
        steps = self._steps()
        for p in steps[: max(0, len(steps) - self.keep_last)]:
            if p.resolve() not in keep:
                shutil.rmtree(p, ignore_errors=True)

    # ------------------------------------------------------------------ load
    def load(
        self,
        path: str | Path,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restores model and optimizer in place (any world size / layout); returns (train_state, meta).
        RNG is restored only when this rank has a saved stream (same world size)."""
        path = resolve(path)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        check_shapes(path, {"model": model_sd})
        _dcp_load(state, path)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        train_state = torch.load(path / "train_state.pt", weights_only=False)
        rng_file = path / "rng" / f"rank_{_rank():05d}.pt"
        if rng_file.exists():
            set_rng_state(torch.load(rng_file, weights_only=False))
        return train_state, json.loads((path / "meta.json").read_text())


def load_model_state(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config dict, full model state dict) from a checkpoint directory, on one process, whatever
    world size or EP degree wrote it. Used by `KimiModel.from_checkpoint`, convert and generate."""
    import yaml

    from kimi.config import config_from_dict
    from kimi.model import KimiModel

    path = resolve(path)
    cfg_file = path / "config.yaml"
    if not cfg_file.exists():
        raise CheckpointError(f"checkpoint '{path}' has no config.yaml; is it a nanoKimi checkpoint?")
    cfg_dict = yaml.safe_load(cfg_file.read_text())
    cfg = config_from_dict(cfg_dict)
    with torch.device("meta"):
        model = KimiModel(cfg.model)
    model = model.to_empty(device="cpu")
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=False))
    _dcp_load({"model": sd}, path)
    return cfg_dict, sd


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
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as e:  # CheckpointException derives from BaseException
        first = str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"cannot load checkpoint '{path}': {first}; was it written with a different config?"
        ) from None
