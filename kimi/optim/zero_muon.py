"""Muon on ZeRO flat partitions: whole-matrix Newton-Schulz when the optimizer only sees a slice of a buffer.

DeepSpeed's ZeRO-1/2 flattens every parameter group into one 1-D buffer (matrices back to back, with
alignment padding), splits it into equal partitions, one per rank of the group's data-parallel process
group, and hands the client optimizer only this rank's fp32 partition. Momentum, weight decay and AdamW
are elementwise and do not care; Newton-Schulz does (on a slice it would orthogonalise the wrong thing).

So, per Muon group and step: all-gather the partitions of the momentum update (one collective over the
group's ranks: M elements received per rank, as much as ZeRO's own parameter all-gather), cut the whole
matrices out of the gathered buffer, run Newton-Schulz on those that overlap this rank's partition (same
shapes batched), scale each by its Muon lr factor, and keep the overlapping elements. A matrix that
straddles a partition boundary is orthogonalised on both ranks, from the same bytes, so both get the same
result. Padding gets a zero update.

`FlatShard` describes the layout; the engine that owns the flattening (kimi/engine/deepspeed.py) builds
it and attaches it to the partition tensor as `p.flat_shard`, which `dist_muon.orthogonalize` checks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from kimi.optim.newton_schulz import NSSpec, default_ns_dtype


@dataclass
class FlatShard:
    """One rank's equal partition of a flat buffer that holds whole matrices (or stacks of them).

    shapes[j], offsets[j]: matrix j's shape and its first element in the flat buffer; scales[j]: the
    factor its orthogonalised update is multiplied by (Muon's RMS matching). The buffer has `numel`
    elements split into `world` partitions of numel / world; this rank holds partition `rank`."""

    shapes: list[torch.Size]
    offsets: list[int]
    scales: list[float]
    numel: int
    rank: int
    world: int
    group: object | None  # the process group the partitions are spread over (None: one rank)

    def __post_init__(self) -> None:
        if self.numel % self.world:
            raise ValueError(f"flat buffer of {self.numel} elements does not split into {self.world} partitions")

    @property
    def size(self) -> int:
        return self.numel // self.world

    @property
    def start(self) -> int:
        return self.rank * self.size


def orthogonalize_flat(shard: FlatShard, update: Tensor, ns: NSSpec, dtype: torch.dtype | None = None) -> Tensor:
    """The scaled Newton-Schulz update of this rank's partition (same shape as `update`: (shard.size,)).
    Collective over `shard.group`: every rank of it must call it for the same buffer."""
    if update.shape != (shard.size,):
        raise ValueError(f"Muon: flat update of shape {tuple(update.shape)}, expected ({shard.size},)")
    dt = dtype or default_ns_dtype(update.device, ns.gram)
    part = update.to(dt)
    if shard.world > 1:
        full = torch.empty(shard.numel, dtype=dt, device=update.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
        gather(full, part.contiguous(), group=shard.group)
    else:
        full = part
    lo, hi = shard.start, shard.start + shard.size
    mine = [j for j, (s, o) in enumerate(zip(shard.shapes, shard.offsets)) if o < hi and o + s.numel() > lo]
    by_shape: dict[torch.Size, list[int]] = {}
    for j in mine:
        by_shape.setdefault(shard.shapes[j], []).append(j)
    out = torch.zeros_like(part)
    for shape, js in by_shape.items():
        mats = torch.stack([full[shard.offsets[j] : shard.offsets[j] + shape.numel()].view(shape) for j in js])
        for j, o in zip(js, ns(mats, dt)):
            o = o.reshape(-1) * shard.scales[j]
            a, b = max(lo, shard.offsets[j]), min(hi, shard.offsets[j] + shape.numel())
            out[a - lo : b - lo] = o[a - shard.offsets[j] : b - shard.offsets[j]]
    return out
