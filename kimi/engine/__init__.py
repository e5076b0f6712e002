"""Engines: what wraps the model and steps it (FSDP2 or DeepSpeed), behind one interface (base.py).

The registry below is the one place that names them; everything an engine knows lives in its own file.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from kimi.config import Config, ConfigError
from kimi.engine.base import Engine

ENGINES = {"fsdp2": "kimi.engine.fsdp2", "deepspeed": "kimi.engine.deepspeed"}  # name -> module
_NEEDS = {"deepspeed": "parallel.engine=deepspeed needs DeepSpeed: pip install -e '.[deepspeed]'"}


def engine_module(name: str):
    """The module of engine `name` (its Engine class is `ENGINE`)."""
    if name not in ENGINES:
        raise ConfigError(f"parallel.engine={name!r} is not one of {', '.join(map(repr, ENGINES))}")
    return importlib.import_module(ENGINES[name])


def engine_class(name: str) -> type[Engine]:
    """The Engine class of `name`; one line when its library is not installed."""
    if name == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise ConfigError(_NEEDS[name]) from None
    return engine_module(name).ENGINE


def build_engine(cfg: Config, model: nn.Module, rt) -> Engine:
    """The engine `cfg.parallel.engine` names, wrapping `model` (a KimiModel on rt.device, the same weights on
    every rank) on the runtime `rt` (kimi.runtime.Runtime: device, mesh, process group)."""
    return engine_class(cfg.parallel.engine)(model, rt, cfg.optim, cfg.parallel, cfg.train)


def read_model_state(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(config dict, full model state dict) from a checkpoint directory, on one process, whatever engine,
    world size or EP degree wrote it (the engine named in its meta.json reads its own files; DeepSpeed
    itself is not needed)."""
    import yaml

    from kimi.checkpoint import META, CheckpointError, read_meta, resolve, verify

    path = resolve(path)
    cfg_file = path / "config.yaml"
    if not cfg_file.exists():
        raise CheckpointError(f"checkpoint '{path}' has no config.yaml; is it a nanoKimi checkpoint?")
    if (path / META).is_file():
        verify(path)
    cfg_dict = yaml.safe_load(cfg_file.read_text())
    wrote = read_meta(path).get("engine", "fsdp2")  # checkpoints from before engines existed are FSDP2's
    return cfg_dict, engine_module(wrote).read_model_state(path, cfg_dict)


__all__ = ["ENGINES", "Engine", "build_engine", "engine_class", "read_model_state"]
