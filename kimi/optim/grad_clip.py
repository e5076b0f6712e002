"""Global-norm gradient clipping over a mix of plain tensors and DTensors on different meshes.

torch.nn.utils.clip_grad_norm_ needs every DTensor on one mesh; with expert parallelism the experts live
on a different mesh than the dense weights. Here each gradient contributes its local squared sum to a
bucket keyed by (mesh, the mesh dims that shard it); each bucket is all-reduced (SUM) once per sharding
mesh dim, so shards are added up and replicas (Replicate dims, and plain tensors, which must be identical
on every rank) are counted once.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor


def grad_norm_sq_buckets(grads: list[Tensor]) -> dict[tuple, tuple[object, tuple[int, ...], list[Tensor]]]:
    """{key: (mesh or None, sharding mesh dims, local grads)}; plain tensors go to the key ()."""
    buckets: dict[tuple, tuple[object, tuple[int, ...], list[Tensor]]] = {}
    for g in grads:
        if hasattr(g, "to_local"):
            if any(pl.is_partial() for pl in g.placements):
                raise ValueError("clip_grad_norm_: a Partial gradient is not reduced yet; reduce it before clipping")
            # Any split counts, including _StridedShard (FSDP2 over EP), whose is_shard() is False.
            dims = tuple(k for k, pl in enumerate(g.placements) if not pl.is_replicate())
            key, mesh, local = (id(g.device_mesh), dims), g.device_mesh, g.to_local()
        else:
            key, mesh, dims, local = (), None, (), g
        buckets.setdefault(key, (mesh, dims, []))[2].append(local)
    return buckets


@torch.no_grad()
def grad_norm(params: Iterable[Tensor]) -> Tensor:
    """The global L2 norm of all gradients (fp32 scalar, on the gradients' device; inf/NaN when one is not
    finite). Every rank must call it with its parameters in the same order; the result is the same on
    every rank."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    device = (grads[0].to_local() if hasattr(grads[0], "to_local") else grads[0]).device
    total = torch.zeros((), dtype=torch.float32, device=device)
    for mesh, dims, ts in grad_norm_sq_buckets(grads).values():
        norms = torch._foreach_norm(ts, 2, dtype=torch.float32)
        sq = torch.stack([n.to(device) for n in norms]).square().sum()
        for k in dims:  # sum over the ranks holding other shards; replicas along other dims already agree
            dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=mesh.get_group(k))
        total += sq
    return total.sqrt()


@torch.no_grad()
def clip_grads_(params: Iterable[Tensor], max_norm: float, total_norm: Tensor) -> None:
    """Scale all gradients in place by min(1, max_norm / (total_norm + 1e-6)); max_norm <= 0 does nothing."""
    if max_norm <= 0:
        return
    locals_ = [g.to_local() if hasattr(g, "to_local") else g for g in (p.grad for p in params) if g is not None]
    coef = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    for t in locals_:
        t.mul_(coef.to(t.device, t.dtype))


def clip_grad_norm_(params: Iterable[Tensor], max_norm: float) -> Tensor:
    """`grad_norm` then `clip_grads_`: clip to `max_norm` now; return the norm before clipping."""
    params = list(params)
    total = grad_norm(params)
    clip_grads_(params, max_norm, total)
    return total
