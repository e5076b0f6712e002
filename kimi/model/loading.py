"""The model's side of loading weights: `.pt` files ({"config": ..., "model": state_dict}) and checking a
state dict against a model. The public entry is `kimi.load_model` (kimi/loading.py), which also reads
checkpoint directories through the code that writes them; kimi.model imports no checkpoint code.

Every failure is a ValueError with one line saying what is wrong (missing file, foreign format,
key or shape mismatch), never a traceback from deep inside load_state_dict.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kimi.config import Config, KimiConfig, from_dict


def model_config_from(cfg: Any) -> KimiConfig:
    """A KimiConfig from what a checkpoint stores: `Config.to_dict()`, `asdict(KimiConfig)` or the objects."""
    if isinstance(cfg, KimiConfig):
        return cfg
    if isinstance(cfg, Config):
        return cfg.model
    if not isinstance(cfg, dict):
        raise ValueError(f"checkpoint config should be a dict, got {type(cfg).__name__}")
    if isinstance(cfg.get("model"), dict) and "n_layer" in cfg["model"]:
        cfg = cfg["model"]  # a whole Config tree: keep its model section
    return from_dict(KimiConfig, cfg, "model")


GIVE = "give a .pt file (python -m kimi.convert), a step directory, OUT/checkpoints/latest or a run's OUT dir"


def read_pt(path, map_location="cpu") -> tuple[KimiConfig, dict[str, torch.Tensor]]:
    """(model config, state dict) from a `.pt` file ({"config": ..., "model": state_dict}). Checkpoint
    directories (DCP or DeepSpeed) are not model code: kimi.load_model takes both."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"'{path}' is a checkpoint directory; read it with kimi.load_model")
    if not path.is_file():
        raise ValueError(f"checkpoint '{path}' does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        if not zipfile.is_zipfile(path):  # not torch.save's format at all: torch's reason would be a paragraph
            raise ValueError(f"'{path}' is not a nanoKimi checkpoint (not a file torch.save wrote); {GIVE}") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if first.startswith("Weights only load failed"):  # torch's essay on weights_only: say what it means
            first = "it holds Python objects besides tensors and plain containers (torch.load(weights_only=True))"
        raise ValueError(f"cannot read checkpoint '{path}': {first}") from None
    if not isinstance(obj, dict) or "config" not in obj or "model" not in obj:
        raise ValueError(f"'{path}' is not a nanoKimi checkpoint (expected a dict with 'config' and 'model')")
    return model_config_from(obj["config"]), obj["model"]


def _clean_key(k: str) -> str:
    # torch.compile wraps modules as `_orig_mod`; DDP prefixes `module.`
    k = k.replace("_orig_mod.", "")
    return k.removeprefix("module.")


def check_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with wrapper prefixes removed, after checking its keys and shapes against `model`
    (which may live on the meta device). Raises ValueError naming the first problem."""
    state_dict = {_clean_key(k): v for k, v in state_dict.items()}
    expected = model.state_dict()
    if getattr(getattr(model, "config", None), "tie_embeddings", False):
        if "lm_head.weight" not in state_dict and "embed_tokens.weight" in state_dict:
            state_dict["lm_head.weight"] = state_dict["embed_tokens.weight"]
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s) e.g. {unexpected[:3]}")
        raise ValueError("checkpoint does not match the model config: " + "; ".join(parts))
    for k, v in expected.items():
        if tuple(state_dict[k].shape) != tuple(v.shape):
            raise ValueError(
                f"checkpoint tensor '{k}' has shape {tuple(state_dict[k].shape)} but the model expects {tuple(v.shape)}"
            )
    return state_dict


def load_state_strict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """load_state_dict(strict=True), with mismatches reported as one readable line."""
    model.load_state_dict(check_state_dict(model, state_dict), strict=True)
