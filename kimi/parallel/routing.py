"""Routing state across ranks: every rank must apply the same router-bias update.

Each MoE layer counts, in `tokens_per_expert` (E,), how many of THIS rank's tokens chose each expert since
the last update. The aux-loss-free bias update must use the global counts (all data-parallel ranks, which
under EP include the EP ranks: every rank reads its own data), or ranks' biases drift apart and they route
the same token differently. One all_reduce carries all layers (stacked (layers, E)).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh


def all_reduce_routing_counts(model: nn.Module, group: dist.ProcessGroup | DeviceMesh | None = None) -> list[Tensor]:
    """Every MoE layer's `tokens_per_expert` summed over `group` (default: the world = all data ranks).

    Returns one (E,) fp32 tensor per layer of `model.moe_layers()` (a copy; the buffers are untouched).
    Without a process group (world size 1) the local counts are returned. Collective: all ranks call it.
    """
    layers = model.moe_layers()
    if not layers:
        return []
    counts_LE = torch.stack([m.tokens_per_expert.detach().float() for m in layers])
    if isinstance(group, DeviceMesh):
        group = group.get_group()
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(counts_LE, group=group)
    return list(counts_LE.unbind(0))


def update_router_bias(model: nn.Module, group: dist.ProcessGroup | DeviceMesh | None = None) -> list[Tensor]:
    """`all_reduce_routing_counts`, then `moe.update_bias(global_counts)` on every layer (which zeroes the
    local counts). Call once per optimizer step, after the last micro-batch. Returns the global counts,
    e.g. for `moe.routing_stats(counts)`."""
    counts = all_reduce_routing_counts(model, group)
    for moe, counts_E in zip(model.moe_layers(), counts):
        moe.update_bias(counts_E)
    return counts
