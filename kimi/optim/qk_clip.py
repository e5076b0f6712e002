"""QK-clip (the "Clip" of Kimi K2's MuonClip): after each optimizer step, shrink the query/key weights of
every attention head whose largest pre-softmax logit since the last step exceeded tau, so that the same
inputs would now give a max logit of exactly tau. Heads under tau are left bit-identical.

The attention modules do the model-specific part (which rows, by sqrt(gamma) or gamma); this file only
needs their contract:
  max_logits_H              (H,) fp32 buffer: max pre-softmax logit per head since the last reset
  reset_max_logits()
  qk_clip_scales(gamma_H) -> [(param, per-row scale (out_features,))], scale exactly 1.0 on unclipped rows
Parameters may be FSDP2 DTensors (any placement whose rows are a contiguous block, e.g. Shard(0) with
uneven rows, (Replicate, Shard(0)), Replicate): only the local rows are scaled, no communication.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn


def all_reduce_max(group=None) -> Callable[[Tensor], None]:
    """A `reduce_fn` for QKClip: in-place MAX all-reduce over `group` (e.g. the data-parallel ranks)."""
    return lambda t: dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)


def scale_rows_(p: Tensor, scale: Tensor) -> None:
    """p[i, ...] *= scale[i] for the rows of p held here; `scale` spans the global rows."""
    if hasattr(p, "to_local"):  # DTensor: scale the local block, which starts at the shard's row offset
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        if not all(type(pl) in (Shard, Replicate) for pl in p.placements):  # e.g. strided: rows not a block
            raise NotImplementedError(f"QK-clip: placements {p.placements} are not Shard/Replicate")
        local = p.to_local()  # a view of the shard: the in-place mul writes through
        _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        rows = scale[offset[0] : offset[0] + local.shape[0]]
    else:
        local, rows = p, scale
    if scale.shape[0] != p.shape[0] or rows.shape[0] != local.shape[0]:
        raise ValueError(f"QK-clip: scale of {scale.shape[0]} rows for a parameter of shape {tuple(p.shape)}")
    local.mul_(rows.to(local.device).view(-1, *[1] * (local.ndim - 1)))


class QKClip:
    """`step()` after each optimizer step: clip heads over `tau`, reset the maxima, return stats.

    `reduce_fn(t)` (optional) reduces the concatenated per-head maxima of all modules in place, e.g.
    `all_reduce_max(dp_group)`, so every rank sees the global max and clips identically: one collective
    per step for all layers. Without it, each rank clips on its own maxima (fine on one process).
    `scale_fn(p, scale)` applies a row scale to a parameter (default `scale_rows_`); an engine whose
    optimizer keeps its own master copy of the weights (DeepSpeed ZeRO) passes one that scales both.
    """

    def __init__(
        self,
        attn_modules: Iterable[nn.Module],
        tau: float = 100.0,
        reduce_fn: Callable | None = None,
        scale_fn: Callable[[Tensor, Tensor], None] = scale_rows_,
    ):
        self.modules, self.scale_fn = list(attn_modules), scale_fn
        if tau <= 0:
            raise ValueError(f"QK-clip: tau={tau} must be > 0 (optim.qk_clip_tau)")
        for m in self.modules:
            if not all(hasattr(m, a) for a in ("max_logits_H", "reset_max_logits", "qk_clip_scales")):
                raise TypeError(f"QK-clip: {type(m).__name__} lacks max_logits_H / reset_max_logits / qk_clip_scales")
        self.tau, self.reduce_fn = float(tau), reduce_fn

    @torch.no_grad()
    def step(self) -> dict:
        if not self.modules:
            return {"max_logit": float("-inf"), "clipped_heads": 0}
        maxes = [m.max_logits_H for m in self.modules]
        flat = torch.cat([x.detach().float() for x in maxes])  # a new tensor: reduce_fn may work in place
        if self.reduce_fn is not None:
            self.reduce_fn(flat)
        over = flat > self.tau  # NaN and -inf (no tokens seen) are never clipped
        gamma = torch.where(over, self.tau / flat, torch.ones_like(flat))
        host = torch.cat([flat.max().view(1), over.float()]).cpu()  # one device->host sync per step
        sizes = [x.numel() for x in maxes]
        for m, g_H, o in zip(self.modules, gamma.split(sizes), host[1:].split(sizes)):
            if o.any():  # leave modules with no clipped head alone (no kernels, no rounding)
                for p, scale in m.qk_clip_scales(g_H):
                    self.scale_fn(p, scale)
            m.reset_max_logits()
        return {"max_logit": float(host[0]), "clipped_heads": int(host[1:].sum())}
