"""`python -m kimi.train --config configs/medium.yaml --dry-run --parallel.dp_shard=8 --parallel.ep=8`

Counts the model on the meta device (no memory, no GPU; a few layers, scaled, so any depth answers at
once) and prints what one GPU will hold under the requested layout: parameters, gradients, optimizer
state and activations, plus FLOPs per step. The world size is dp_replicate x dp_shard (WORLD_SIZE from
torchrun when set).

Shared by every engine: activations (per micro-batch, `layer_activations`) are roughly 34*D + 5*H*T bytes
per token and layer in bf16 without checkpointing (Korthikanti et al. 2022, flash attention drops the
5*H*T term), with MLA's expanded keys/values in place of D-wide ones, plus a MoE layer's routed rows;
moe.recompute and attention.recompute_kv take out what they rebuild in backward. With activation
checkpointing: one D-vector per token and layer, plus the largest layer recomputed; plus the loss's
working memory (`head_bytes`: the fp32 logits and their gradient, or with model.loss_chunk_tokens one
chunk's and the gradients it holds). Parameters,
gradients and optimizer state are each engine's own model (`memory_estimate` in kimi/engine/<name>.py);
every registered engine is printed, the configured one marked. `params`, `grads` and `optim` are what a
rank holds from one step to the next; `buffers` are working copies alive only inside a step (FSDP2's
all-gathered block). Precision follows the config: bf16 working copies where the run autocasts to bf16
(train.dtype=bf16, or auto on a GPU: with train.device=auto the dry run plans for GPUs), fp32 otherwise
(--train.device=cpu predicts a CPU run).
These are estimates to plan a layout: the states are checked against real gloo runs at world 1 to 8 in
docs/training.md (tests/unit/test_dry_run_measured.py at world 1 and 2); `python -m kimi.bench` measures.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from kimi.config import Config, ConfigError, KimiConfig, TrainConfig

GiB = 1024**3


def _fmt(n_bytes: float) -> str:
    return f"{n_bytes / GiB:8.2f} GiB"


def _counts(cfg: Config, m: KimiConfig) -> dict[str, int]:
    """What the plan needs from the model `m` (a variant of cfg.model), built on the meta device."""
    from kimi.model import KimiModel
    from kimi.optim.muon import param_group_name

    with torch.device("meta"):
        model = KimiModel(m)
    named = list(model.named_parameters())
    return {
        "total": model.num_params(),
        "active": model.num_active_params(),
        "non_embedding": model.num_params(non_embedding=True),
        "expert_params": sum(p.numel() for n, p in named if ".experts." in n),
        "muon": sum(p.numel() for n, p in named if param_group_name(n, p, cfg.optim) == "muon"),
        "flops_per_token": model.flops_per_token(cfg.block_size),
        "block_params": max(sum(p.numel() for p in blk.parameters()) for blk in model.layers),
        "block_expert": max(sum(p.numel() for n, p in b.named_parameters() if ".experts." in n) for b in model.layers),
    }


def _with_layers(m: KimiConfig, dense: int, moe: int) -> KimiConfig:
    if not m.moe.use_moe:
        return dataclasses.replace(m, n_layer=dense)
    return dataclasses.replace(m, n_layer=dense + moe, moe=dataclasses.replace(m.moe, first_k_dense_replace=dense))


def model_counts(cfg: Config) -> dict[str, int]:
    """The model's sizes without building all of it: every count is linear in the number of dense and MoE
    layers (the two kinds of Block, each the same at every depth), so three models of at most three layers
    give its slope per kind and the rest. Building the whole model on the meta device still costs Python
    objects per layer: --model.n_layer=100000 took minutes and gigabytes; this takes the same time at any depth."""
    m = cfg.model
    moe = max(0, m.n_layer - m.moe.first_k_dense_replace) if m.moe.use_moe else 0  # as KimiConfig.is_moe_layer
    dense = m.n_layer - moe
    d0, m0 = min(dense, 1), min(moe, 1)
    base = _counts(cfg, _with_layers(m, d0, m0))
    per_dense = _counts(cfg, _with_layers(m, d0 + 1, m0)) if dense else {}
    per_moe = _counts(cfg, _with_layers(m, d0, m0 + 1)) if moe else {}
    out = {}
    for k, v in base.items():
        if k.startswith("block_"):  # the largest block: every kind is in `base`
            out[k] = v
            continue
        slope_d = per_dense[k] - v if dense else 0
        slope_m = per_moe[k] - v if moe else 0
        out[k] = v + slope_d * (dense - d0) + slope_m * (moe - m0)
    # What is outside every block (embedding, final norm, head): FSDP2's root, kept gathered through a step.
    out["root_params"] = out["total"] - sum(
        n * (c["total"] - base["total"]) for n, c in ((dense, per_dense), (moe, per_moe)) if n
    )
    return out


def working_bytes(train: TrainConfig) -> int:
    """Bytes per element of the weights' working copies (FSDP2's all-gathered blocks, DeepSpeed's module and
    its gradients): 2 where the run autocasts to bf16 (kimi.runtime's rule, with device auto taken as a GPU),
    else 4."""
    bf16 = train.dtype == "bf16" or (train.dtype == "auto" and train.device != "cpu")
    return 2 if bf16 else 4


def head_bytes(m: KimiConfig, tokens: int) -> int:
    """The loss's working memory for one micro-batch of `tokens`: the fp32 logits and their gradient, (tokens,
    V) each; with model.loss_chunk_tokens (kimi/model/loss.py) one chunk's fp32 logits and a working copy,
    plus the fp32 gradients of the hidden states and of the head weight, computed in forward and held until
    backward."""
    if not m.loss_chunk_tokens:
        return tokens * m.vocab_size * 4 * 2
    return min(tokens, m.loss_chunk_tokens) * m.vocab_size * 4 * 2 + (tokens + m.vocab_size) * m.n_embd * 4


def layer_activations(m: KimiConfig, ep: int) -> tuple[int, int]:
    """Bytes per token that one (dense, MoE) layer keeps for backward, at 2 bytes a value.

    34*D counts a transformer layer with flash attention and D-wide K and V. MLA keeps instead kv_b_proj's
    output and the keys with the shared rope key on every head, H*(2n + v + R) values; with
    attention.recompute_kv only the rope key R (rebuilt from the latent, which is kept anyway). A MoE layer
    adds, per chosen expert, the gathered input and the expert output (D each) and four F-wide SwiGLU
    tensors; moe.recompute rebuilds the gathered input and silu(W1x), but under EP the rows received from
    the all-to-all (the region's input) stay, in place of the gathered ones.
    """
    D, a, moe = m.n_embd, m.attention, m.moe
    layer = 34 * D
    if a.type == "mla":
        expanded = m.n_head * (2 * a.qk_nope_head_dim + a.v_head_dim + a.qk_rope_head_dim)
        layer += 2 * ((a.qk_rope_head_dim if a.recompute_kv else expanded) - 2 * D)
    if not moe.use_moe:
        return layer, layer
    F = moe.expert_hidden or 0
    rows = 2 * D + 4 * F - (F + (D if ep == 1 else 0) if moe.recompute else 0)
    return layer, layer + 2 * moe.top_k * rows


def memory_plan(cfg: Config, world: int) -> dict:
    """Sizes of cfg's model (model_counts), its activations, and each engine's per-GPU estimate
    (`memory_estimate` in kimi/engine/<name>.py: {"params", "grads", "optim", "buffers", "activations"} in
    bytes)."""
    from kimi.engine import ENGINES, engine_module
    from kimi.parallel import ParallelDims

    m = cfg.model
    dims = ParallelDims.for_model(cfg.parallel, m, world)
    counts = model_counts(cfg)
    T, D = cfg.block_size, m.n_embd
    tokens = cfg.train.micro_batch_size * T
    dense_layer, moe_layer = layer_activations(m, dims.ep)
    n_moe = max(0, m.n_layer - m.moe.first_k_dense_replace) if m.moe.use_moe else 0  # as KimiConfig.is_moe_layer
    if cfg.train.activation_checkpointing:
        act = tokens * D * 2 * m.n_layer + tokens * (moe_layer if n_moe else dense_layer)
    else:
        act = tokens * ((m.n_layer - n_moe) * dense_layer + n_moe * moe_layer)
    sizes = {
        "total": counts["total"],
        "expert_params": counts["expert_params"],
        "muon": counts["muon"],
        "block_params": counts["block_params"],
        "block_expert": counts["block_expert"],
        "root_params": counts["root_params"],
        "working_bytes": working_bytes(cfg.train),
        "activations": act + head_bytes(m, tokens),
    }
    return {
        "world": dims.world_size,
        "dims": dims,
        "total": counts["total"],
        "active": counts["active"],
        "non_embedding": counts["non_embedding"],
        "expert_params": counts["expert_params"],
        "flops_per_step": counts["flops_per_token"] * cfg.train.global_batch_size * T,
        "sizes": sizes,
        "engines": {name: engine_module(name).memory_estimate(sizes, dims, cfg.parallel) for name in ENGINES},
    }


def dry_run(cfg: Config) -> dict[str, float]:
    p = cfg.parallel
    world = int(os.environ.get("WORLD_SIZE", "0")) or max(1, p.dp_replicate) * max(1, p.dp_shard)
    plan = memory_plan(cfg, world)
    d = plan["dims"]
    per_step = cfg.train.micro_batch_size * plan["world"]
    if cfg.train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by train.micro_batch_size="
            f"{cfg.train.micro_batch_size} x world {plan['world']}; lower the micro-batch or raise the global batch"
        )
    accum = cfg.train.global_batch_size // per_step
    print(
        f"layout: world {plan['world']} = dp_replicate {d.dp_replicate} x dp_shard {d.dp_shard}; ep {d.ep} "
        f"(experts per GPU: {cfg.model.moe.num_experts // d.ep if cfg.model.moe.use_moe else 0})"
    )
    print(
        f"parameters: total {plan['total']:,} | active per token {plan['active']:,} | "
        f"non-embedding {plan['non_embedding']:,} | in experts {plan['expert_params']:,}"
    )
    print(
        f"batch: global {cfg.train.global_batch_size} x {cfg.block_size} tokens, micro {cfg.train.micro_batch_size}, "
        f"gradient accumulation {accum}"
    )
    names = list(plan["engines"])
    heads = [f"{n}{' ZeRO-' + str(cfg.parallel.deepspeed.zero_stage) if n == 'deepspeed' else ''}" for n in names]
    heads = [f"{h}{' *' if n == cfg.parallel.engine else ''}" for h, n in zip(heads, names)]
    print("per-GPU memory (estimate; * = parallel.engine):  " + " ".join(f"{h:>20}" for h in heads))
    for k in ("params", "grads", "optim", "buffers", "activations", "total"):
        cols = [sum(e.values()) if k == "total" else e[k] for e in plan["engines"].values()]
        print(f"  {k:<12}" + " ".join(f"{_fmt(c):>20}" for c in cols))
    print(
        f"training FLOPs per step: {plan['flops_per_step']:.3e} ({plan['flops_per_step'] / 989e12:.2f} s at H100 bf16 peak)"
    )
    return plan
