"""The models `kimi.bench compare` trains, as data: each variant is a name and config overrides on top
of a bench config (configs/bench/*.yaml, which holds the shared shape, data, batch and nanoKimi's recipe).

  nanogpt        the nanoGPT / GPT-2 equivalent built from this project's code: MHA, learned positions,
                 LayerNorm, dense 4x GELU MLP, tied head, AdamW (wd 0.1, cosine to lr/10, warmup, clip 1),
                 no QK-clip. Its lr is swept (`baseline_lrs`) and the best run is the reference.
  kimi           the bench config itself (MLA + aux-free MoE + Muon/QK-clip), at matched active params.
  ablations      one idea at a time (see ABLATIONS).

"Matched" means the same width and depth and the same *active non-embedding* parameter count as the
baseline: `match_active` solves for the FFN width (expert_hidden for MoE, intermediate_size for dense),
which enters that count linearly. A MoE variant's dense layers get the MoE layers' active FFN width.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kimi.config import Config, flatten_dict, load_config, merge_dicts


def nanogpt_overrides(cfg: Config, lr: float) -> dict[str, Any]:
    """The baseline at cfg's width, depth, block, batch and schedule length. beta2 follows nanoGPT:
    0.99 for its small-batch shakespeare_char setting (byte vocab), else GPT-2's 0.95."""
    beta2 = 0.99 if cfg.model.vocab_size <= 512 else 0.95
    return {
        "model": {"mlp": "gelu", "pos_emb": "learned", "norm": "layernorm", "tie_embeddings": True,
                  "intermediate_size": 4 * cfg.model.n_embd},
        "attention": {"type": "mha", "bias": False, "track_max_logits": False},
        "moe": {"use_moe": False},
        "optim": {"name": "adamw", "lr": lr, "betas": [0.9, beta2], "weight_decay": 0.1, "schedule": "cosine",
                  "min_lr_ratio": 0.1, "grad_clip": 1.0, "qk_clip": False},
    }  # fmt: skip


# A modern dense model: what the baseline becomes with RoPE, RMSNorm and SwiGLU (no MoE, no MLA).
_MODERN_DENSE = {
    "model": {"mlp": "swiglu", "pos_emb": "rope", "norm": "rmsnorm", "tie_embeddings": False},
    "attention": {"type": "mha", "track_max_logits": True},
    "moe": {"use_moe": False},
}

# name -> (overrides on top of the bench config, what it isolates). Ordered cheapest-question-first.
ABLATIONS: dict[str, tuple[dict[str, Any], str]] = {
    "dense_adamw": (_MODERN_DENSE | {"optim": {"name": "adamw", "qk_clip": False}}, "modern dense block, AdamW"),
    "dense_muon": (_MODERN_DENSE | {"optim": {"name": "muon"}}, "modern dense block, Muon (Muon's effect)"),
    "kimi_adamw": (
        {"optim": {"name": "adamw", "qk_clip": False, "expert_lr_mult": 1.0}},  # one lr for all
        "MoE + MLA with AdamW (MoE without Muon)",
    ),
    "kimi_mha": ({"attention": {"type": "mha"}}, "MHA instead of MLA"),
    "kimi_no_auxfree": ({"moe": {"aux_loss_free": False}}, "aux-loss-free bias off"),
    "kimi_e4k2": ({"moe": {"num_experts": 4, "top_k": 2}}, "4 routed experts, top-2 (expert count)"),
    "kimi_e16k2": ({"moe": {"num_experts": 16, "top_k": 2}}, "16 routed experts, top-2 (expert count)"),
    "kimi_e16k4": ({"moe": {"num_experts": 16, "top_k": 4}}, "16 experts top-4: half-width experts (granularity)"),
    "kimi_e32k8": ({"moe": {"num_experts": 32, "top_k": 8}}, "32 experts top-8: quarter-width (granularity)"),
}


@dataclass
class Variant:
    name: str
    overrides: dict[str, Any]
    about: str = ""
    group: str = ""  # the baseline's lr sweep share a group ("nanogpt"); the best of a group is kept
    lr: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def flatten(tree: dict[str, Any]) -> list[str]:
    """{'moe': {'top_k': 2}} -> ['--moe.top_k=2'] (lists as [a,b], None as null)."""
    out = []
    for key, v in flatten_dict(tree).items():
        val = "null" if v is None else (f"[{','.join(map(str, v))}]" if isinstance(v, (list, tuple)) else v)
        out.append(f"--{key}={val}")
    return out


def active_non_embedding(cfg: Config) -> int:
    from kimi.model import KimiModel

    with torch.device("meta"):
        return KimiModel(cfg.model).num_active_params(non_embedding=True)


def total_params(cfg: Config) -> int:
    from kimi.model import KimiModel

    with torch.device("meta"):
        return KimiModel(cfg.model).num_params()


def param_counts(cfg: Config) -> dict[str, int]:
    from kimi.model import KimiModel

    with torch.device("meta"):
        m = KimiModel(cfg.model)
    return {"params_total": m.num_params(), "params_active": m.num_active_params(),
            "params_non_embedding": m.num_params(non_embedding=True),
            "params_active_non_embedding": m.num_active_params(non_embedding=True)}  # fmt: skip


def _width_overrides(cfg: Config, h: int) -> dict[str, Any]:
    if not cfg.model.moe.use_moe:
        return {"model": {"intermediate_size": h}}
    dense = (cfg.model.moe.n_shared_experts + cfg.model.moe.top_k) * h  # dense layers: the same active width
    return {"model": {"intermediate_size": dense}, "moe": {"expert_hidden": h}}


def match_active(
    config_path: str | None, overrides: dict[str, Any], target: int, multiple: int = 8, measure=active_non_embedding
) -> dict[str, Any]:
    """Overrides with the FFN width set so `measure(cfg)` (default: the active non-embedding count) is
    closest to `target`. Counts are affine in the width h, so two evaluations give the line; h is rounded
    to `multiple`."""
    cfg = load_config(config_path, overrides)

    def count(h: int) -> int:
        return measure(load_config(config_path, merge_dicts(overrides, _width_overrides(cfg, h))))

    a, b = count(multiple), count(2 * multiple)
    slope = (b - a) / multiple
    h = max(multiple, round((multiple + (target - a) / slope) / multiple) * multiple)
    return merge_dicts(overrides, _width_overrides(cfg, h))


def build_variants(
    config_path: str, baseline_lrs: list[float], ablations: list[str], base: dict | None = None, match: bool = True
) -> tuple[list[Variant], int]:
    """The baseline lr sweep, nanoKimi and the requested ablations, all at the baseline's active
    non-embedding size when `match`. `base`: overrides every variant starts from (the command line's).
    Returns (variants, that target size)."""
    base = base or {}
    cfg = load_config(config_path, base)
    unknown = [a for a in ablations if a not in ABLATIONS]
    if unknown:
        raise ValueError(f"unknown ablation(s) {', '.join(unknown)}; choose from {', '.join(ABLATIONS)}")
    out = [
        Variant(
            f"nanogpt_lr{lr:g}",
            merge_dicts(base, nanogpt_overrides(cfg, lr)),
            "nanoGPT-equivalent baseline",
            "nanogpt",
            lr,
        )
        for lr in baseline_lrs
    ]
    target = active_non_embedding(load_config(config_path, out[0].overrides))
    for name, (ov, about) in [
        ("kimi", ({}, "nanoKimi recipe (the bench config)")),
        *((a, ABLATIONS[a]) for a in ablations),
    ]:
        ov = merge_dicts(base, ov)
        out.append(Variant(name, match_active(config_path, ov, target) if match else ov, about, name))
    return out, target


def matched_pair(config_path: str, overrides: list[str]) -> tuple[Config, Config]:
    """(nanoKimi, nanoGPT-equivalent) configs as `compare` builds them: the config's recipe at the
    baseline's active non-embedding size, and the baseline at nanoGPT's lr."""
    from kimi.config import parse_overrides

    variants, _ = build_variants(config_path, [1e-3], [], parse_overrides(overrides))
    return load_config(config_path, variants[1].overrides), load_config(config_path, variants[0].overrides)


def baseline_at_total(config_path: str, overrides: list[str]) -> Config:
    """The nanoGPT-equivalent with its MLP widened until its *total* params match nanoKimi's (the memory
    claim's comparison: a dense model holding as many parameters as the MoE)."""
    from kimi.config import parse_overrides

    variants, _ = build_variants(config_path, [1e-3], [], parse_overrides(overrides))
    target = total_params(load_config(config_path, variants[1].overrides))
    return load_config(config_path, match_active(config_path, variants[0].overrides, target, measure=total_params))
