"""`python -m kimi.train --config configs/medium.yaml --dry-run --parallel.dp_shard=8 --parallel.ep=8`

Builds the model on the meta device (no memory, no GPU) and prints what one GPU will hold under the
requested layout: parameters, gradients, optimizer state and activations, plus FLOPs per step. The
world size is dp_replicate x dp_shard (WORLD_SIZE from torchrun when set).

The memory model (per GPU, fp32 master weights as FSDP2 keeps them):
- parameters: every weight is sharded over dp_shard (experts: over ep inside it, the rest over
  dp_shard_mod_ep; dense weights: over dp_shard), 4 bytes each, plus the largest block unsharded in
  the compute dtype while FSDP2 all-gathers it;
- gradients: the same shards, fp32;
- optimizer: Muon keeps one momentum buffer (4 B), AdamW two moments (8 B);
- activations (per micro-batch): roughly 34*D + 5*H*T bytes per token and layer in bf16 without
  checkpointing (Korthikanti et al. 2022, flash attention drops the 5*H*T term) plus the MoE's
  dispatched copies (top_k x (D + 3F)) x 2 bytes; with activation checkpointing one D-vector per
  token and layer, plus one layer recomputed.
The deepspeed engine (ZeRO-1/2, kimi/engine/deepspeed.py) is printed beside it: parameters are
replicated in bf16 (2 B; experts over ep as with FSDP2), the fp32 master weights (4 B) and optimizer
state are partitioned over all ranks (experts over their replicas), gradients are full bf16 copies with
ZeRO-1 and partitioned with ZeRO-2. FSDP2 keeps no bf16 copy but all-gathers a block at a time;
DeepSpeed trades that memory for no parameter all-gathers in the forward and backward.
These are estimates to plan a layout, not measurements: `python -m kimi.bench` measures.
"""

from __future__ import annotations

import os

import torch

from kimi.config import Config, ConfigError

GiB = 1024**3


def _fmt(n_bytes: float) -> str:
    return f"{n_bytes / GiB:8.2f} GiB"


def memory_plan(cfg: Config, world: int) -> dict[str, float]:
    from kimi.model import KimiModel
    from kimi.optim.muon import param_group_name
    from kimi.parallel import ParallelDims

    m = cfg.model
    dims = ParallelDims.for_model(cfg.parallel, m, world)
    with torch.device("meta"):
        model = KimiModel(m)
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    total = model.num_params()
    muon = sum(p.numel() for n, p in model.named_parameters() if param_group_name(n, p, cfg.optim) == "muon")
    adamw = total - muon
    shard = dims.dp_shard
    params_per_gpu = total / shard  # experts: / (ep * dp_shard_mod_ep) == / dp_shard as well
    block_params = max(sum(p.numel() for p in blk.parameters()) for blk in model.layers)
    block_expert = max(sum(p.numel() for n, p in blk.named_parameters() if ".experts." in n) for blk in model.layers)
    gathered = (block_params - block_expert + block_expert / max(1, dims.ep)) * 2  # bf16 all-gathered block
    T, D = cfg.block_size, m.n_embd
    tokens = cfg.train.micro_batch_size * T
    moe_extra = m.moe.top_k * (D + 3 * (m.moe.expert_hidden or 0)) * 2 if m.moe.use_moe else 0
    if cfg.train.activation_checkpointing:
        act = tokens * D * 2 * m.n_layer + tokens * (34 * D + moe_extra)
    else:
        act = tokens * (34 * D + moe_extra) * m.n_layer
    logits = tokens * m.vocab_size * 4 * 2  # fp32 logits and their gradient
    flops_step = model.flops_per_token(T) * cfg.train.global_batch_size * T
    return {
        "world": dims.world_size,
        "dims": dims,
        "total": total,
        "active": model.num_active_params(),
        "non_embedding": model.num_params(non_embedding=True),
        "expert_params": expert_params,
        "params": params_per_gpu * 4 + gathered,
        "grads": params_per_gpu * 4,
        "optim": (muon * 4 + adamw * 8) / shard,
        "activations": act + logits,
        "flops_per_step": flops_step,
        "deepspeed": deepspeed_memory(total, expert_params, dims, cfg.parallel.zero_stage),
    }


def deepspeed_memory(total: int, experts: int, dims, zero_stage: int) -> dict[str, float]:
    """Per-GPU bytes of the deepspeed engine (bf16 on GPU): params, grads (ZeRO-2: partitioned), optimizer
    extras beyond FSDP2's (the fp32 master partitions). Optimizer state and activations are FSDP2's."""
    local = total - experts + experts / max(1, dims.ep)  # this rank's parameters: dense whole, its experts
    partition = total / dims.world_size  # dense over all ranks, experts over their world/ep replicas
    return {
        "params": local * 2 + partition * 4,  # bf16 model copy + fp32 master partition
        "grads": (local if zero_stage == 1 else partition) * 2,
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
    ds = {**{k: plan[k] for k in ("optim", "activations")}, **plan["deepspeed"]}
    zero = f"deepspeed ZeRO-{cfg.parallel.zero_stage}"
    chosen = {"fsdp2": 0, "deepspeed": 1}[cfg.parallel.engine]
    heads = [f"{h}{' *' if i == chosen else ''}" for i, h in enumerate(("fsdp2", zero))]
    print(f"per-GPU memory (estimate; * = parallel.engine):  {heads[0]:>12} {heads[1]:>20}")
    for k in ("params", "grads", "optim", "activations"):
        print(f"  {k:<12}{_fmt(plan[k])} {_fmt(ds[k]):>20}")
    peak = sum(plan[k] for k in ("params", "grads", "optim", "activations"))
    print(f"  {'total':<12}{_fmt(peak)} {_fmt(sum(ds.values())):>20}")
    print(
        f"training FLOPs per step: {plan['flops_per_step']:.3e} ({plan['flops_per_step'] / 989e12:.2f} s at H100 bf16 peak)"
    )
    return plan
