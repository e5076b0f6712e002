"""`kimi.load_model`: trained weights -> a single-device KimiModel, whatever wrote them.

    model = kimi.load_model("out/nano")   # a .pt file, a step dir, OUT/checkpoints/latest|best, or OUT itself

A `.pt` file ({"config", "model"}) is the model's own format, read by kimi.model.loading. A checkpoint
directory of either engine (FSDP2's DCP shards, DeepSpeed's ZeRO files) is read on one process, whatever
world size or EP degree wrote it, by the code that writes it. This module sits above checkpoint and engine
code so that kimi.model never imports them (the import-linter contracts in pyproject.toml).
"""

from __future__ import annotations

from pathlib import Path

import torch

from kimi.config import KimiConfig
from kimi.model import KimiModel
from kimi.model.loading import load_state_strict, model_config_from, read_pt


def read_weights(path: str | Path, map_location="cpu") -> tuple[KimiConfig, dict[str, torch.Tensor]]:
    """(model config, full state dict) from anything load_model takes, without building the model (for
    kimi.convert). `map_location` applies to `.pt` files; directories are read onto the CPU."""
    if not Path(path).is_dir():
        return read_pt(path, map_location)
    from kimi.engine import read_model_state  # the engines' readers; torch.distributed only when needed

    cfg_dict, state_dict = read_model_state(path)
    return model_config_from(cfg_dict), state_dict


def tokenizer_name_of(path: str | Path) -> str | None:
    """The tokenizer a checkpoint directory was trained with (file tokenizers pointed at the checkpoint's own
    copies of their files), or the one beside a `.pt` file; None where a `.pt` has none."""
    from kimi.checkpoint import read_meta, resolve
    from kimi.data.tokenizer_files import CHECKPOINT_DIR, name_in, tokenizer_of_pt

    step = resolve(path)
    if not step.is_dir():
        return tokenizer_of_pt(step)  # kimi.convert --from-hf puts an HF checkpoint's tokenizer beside the .pt
    return name_in(read_meta(step).get("tokenizer", "gpt2"), step / CHECKPOINT_DIR)


def load_model(path: str | Path, map_location="cpu") -> KimiModel:
    """A KimiModel with the weights (and buffers: router biases) stored at `path`, in train mode as built.
    Every failure is a ValueError of one line (missing file, foreign format, key or shape mismatch)."""
    cfg, state_dict = read_weights(path, map_location)
    model = KimiModel(cfg)
    load_state_strict(model, state_dict)
    return model
