"""Newton-Schulz on whole matrices when Muon's parameters are DTensors (FSDP2 / HSDP / EP), and on the
local tensors, with no communication, when they are not.

Running Newton-Schulz on a row shard of a matrix is wrong (it orthogonalises the shard, not the matrix).
Each parameter falls in one of three cases, decided from its placements alone (identical on every rank):

  local     plain tensor, or a DTensor whose placements split no matrix dim (the last two): Replicate, or
            (strided) Shard along a batch dim, e.g. the expert dim of (E, F, D) expert weights sharded by EP
            and FSDP2's Shard(0). Every local (A, B) slice is a whole matrix: NS runs on the local tensor.
  gathered  a DTensor split along one matrix dim d by exactly one mesh dim (FSDP2 Shard(0) of a 2-D weight,
            HSDP (Replicate, Shard(0)), an expert stack sharded (Shard(0) by EP, Shard(1) by FSDP)).
            Each matrix gets an owner rank in that mesh dim's group; see the exchange below.
  fallback  anything else (two mesh dims splitting the matrix, strided shards): full_tensor() everywhere,
            NS everywhere, keep the local slice. Correct but N times the bytes; no layout we build takes it.

The gathered exchange, per group of parameters that share a (mesh, mesh dim), N ranks in it:
  1. owners: matrices sorted by NS cost (numel * min(A, B)), each given to the least-loaded rank so far
     (ties -> lowest rank): same-size matrices are dealt round-robin; deterministic on every rank.
  2. all_to_all_single #1: every rank sends each owner its shard of the matrices that owner owns; the owner
     concatenates the N shards (torch.chunk layout along d, as DTensor Shard and FSDP2 use, uneven and
     empty shards included) into whole matrices.
  3. owners run NS on their matrices, same-shape ones batched into one call.
  4. all_to_all_single #2: owners send every rank its shard of each result.
  Bytes per rank per step, with M = the group's total elements and the NS dtype (bf16 on CUDA):
  about 2 * M/N * (N-1)/N each way, i.e. 2/N of one all-gather of the updates (which would move
  M * (N-1)/N into every rank); two collectives per group, no padding.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from kimi.optim.newton_schulz import NSSpec, default_ns_dtype
from kimi.optim.zero_muon import orthogonalize_flat


def _is_dtensor(t: Tensor) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "placements")


def chunk_size_and_offset(n: int, num_chunks: int, idx: int) -> tuple[int, int]:
    """Rows of chunk `idx` when n rows are split like torch.chunk (ceil-sized, trailing chunks may be empty)."""
    c = -(-n // num_chunks)
    start = min(idx * c, n)
    return min(n, start + c) - start, start


def _classify(p: Tensor) -> tuple[str, int, int]:
    """('local' | 'gathered' | 'fallback', mesh dim, tensor dim) for a Muon parameter."""
    if not _is_dtensor(p):
        return "local", -1, -1
    from torch.distributed.tensor import Shard

    splits = []  # (mesh dim, tensor dim, plain Shard?) of placements that split a matrix dim
    for k, pl in enumerate(p.placements):
        if pl.is_partial():
            raise ValueError("Muon: a parameter with a Partial placement has no well-defined update; reduce it first")
        if not pl.is_replicate():  # Shard, or e.g. _StridedShard (FSDP2 over EP), whose is_shard() is False
            d = getattr(pl, "dim", p.ndim - 1) % p.ndim  # a split of unknown kind: assume a matrix dim
            if d >= p.ndim - 2:
                splits.append((k, d, type(pl) is Shard))
    if not splits:
        return "local", -1, -1
    if len(splits) == 1 and splits[0][2]:
        return "gathered", splits[0][0], splits[0][1]
    return "fallback", -1, -1


def _ns_batched(mats: list[Tensor], ns: NSSpec, dtype: torch.dtype | None) -> list[Tensor]:
    """Newton-Schulz on a list of (..., A, B) tensors, one batched call per distinct shape."""
    out: list[Tensor | None] = [None] * len(mats)
    by_shape: dict[tuple, list[int]] = {}
    for i, m in enumerate(mats):
        by_shape.setdefault((tuple(m.shape), m.device), []).append(i)
    for idx in by_shape.values():
        if len(idx) == 1:
            out[idx[0]] = ns(mats[idx[0]], dtype)
        else:
            res = ns(torch.stack([mats[i] for i in idx]), dtype)
            for j, i in enumerate(idx):
                out[i] = res[j]
    return out  # type: ignore[return-value]


def orthogonalize(
    params: list[Tensor], updates: list[Tensor], ns: NSSpec, dtype: torch.dtype | None = None
) -> list[Tensor]:
    """ns(update) for each Muon parameter, returned as rank-local tensors shaped like each update.
    A ZeRO flat partition (a tensor with a `flat_shard`, see zero_muon.py) gets its update with each
    matrix's Muon lr scale already applied, since one partition holds matrices of different shapes.

    `updates[i]` is the local data of params[i]'s momentum update (same layout as the local shard).
    Must be called by every rank of every mesh involved with the same parameter list.
    """
    out: list[Tensor | None] = [None] * len(params)
    local: list[int] = []
    buckets: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (id(mesh), mesh dim) -> [(i, tensor dim)]
    for i, p in enumerate(params):
        if hasattr(p, "flat_shard"):  # a ZeRO flat partition (DeepSpeed engine): returned already lr-scaled
            out[i] = orthogonalize_flat(p.flat_shard, updates[i], ns, dtype)
            continue
        kind, k, d = _classify(p)
        if kind == "local":
            local.append(i)
        elif kind == "gathered":
            buckets.setdefault((id(p.device_mesh), k), []).append((i, d))
        else:
            out[i] = _ns_fallback(p, updates[i], ns, dtype)
    for i, o in zip(local, _ns_batched([updates[i] for i in local], ns, dtype)):
        out[i] = o
    for (_, k), items in buckets.items():
        res = _ns_gathered(params[items[0][0]].device_mesh, k, [params[i] for i, _ in items],
                           [updates[i] for i, _ in items], [d for _, d in items], ns, dtype)  # fmt: skip
        for (i, _), o in zip(items, res):
            out[i] = o
    return out  # type: ignore[return-value]


def _assign_owners(shapes: list[torch.Size], n: int) -> list[int]:
    """Greedy longest-first: the costliest matrix goes to the least-loaded rank (ties: lowest rank)."""
    cost = [math.prod(s) * min(s[-2], s[-1]) for s in shapes]
    load, owner = [0] * n, [0] * len(shapes)
    for j in sorted(range(len(shapes)), key=lambda j: (-cost[j], j)):
        r = min(range(n), key=lambda r: (load[r], r))
        owner[j], load[r] = r, load[r] + cost[j]
    return owner


def _ns_gathered(mesh, k: int, params: list[Tensor], updates: list[Tensor], dims: list[int], ns: NSSpec,
                 dtype: torch.dtype | None) -> list[Tensor]:  # fmt: skip
    group, n, me = mesh.get_group(k), mesh.size(k), mesh.get_local_rank(k)
    dt = dtype or default_ns_dtype(updates[0].device, ns.gram)
    owner = _assign_owners([p.shape for p in params], n)
    owned = [[j for j in range(len(params)) if owner[j] == r] for r in range(n)]

    def shard_shape(j: int, r: int) -> list[int]:
        shape = list(updates[j].shape)  # batch dims split by other mesh dims are the same across this group
        shape[dims[j]] = chunk_size_and_offset(params[j].shape[dims[j]], n, r)[0]
        return shape

    for j, u in enumerate(updates):
        if list(u.shape) != shard_shape(j, me):
            raise RuntimeError(f"Muon: local shard {tuple(u.shape)} of a {tuple(params[j].shape)} parameter is not the "
                               f"torch.chunk layout along dim {dims[j]} over {n} ranks")  # fmt: skip

    # 1) every rank -> owners: shards of the owners' matrices
    send = [updates[j].to(dt).reshape(-1) for r in range(n) for j in owned[r]]
    in_splits = [sum(updates[j].numel() for j in owned[r]) for r in range(n)]
    out_splits = [sum(math.prod(shard_shape(j, s)) for j in owned[me]) for s in range(n)]
    recv = _all_to_all(send, in_splits, out_splits, dt, updates[0].device, group)
    pieces = iter(recv.split([math.prod(shard_shape(j, s)) for s in range(n) for j in owned[me]]))
    parts: dict[int, list[Tensor]] = {j: [] for j in owned[me]}
    for s in range(n):
        for j in owned[me]:
            parts[j].append(next(pieces).view(shard_shape(j, s)))
    full = _ns_batched([torch.cat(parts[j], dim=dims[j]) for j in owned[me]], ns, dt)

    # 2) owners -> every rank: each rank's rows of every result
    send = []
    for s in range(n):
        for j, o in zip(owned[me], full):
            size, off = chunk_size_and_offset(params[j].shape[dims[j]], n, s)
            send.append(o.narrow(dims[j], off, size).reshape(-1))
    recv = _all_to_all(send, out_splits, in_splits, dt, updates[0].device, group)
    pieces = iter(recv.split([updates[j].numel() for r in range(n) for j in owned[r]]))
    res: list[Tensor | None] = [None] * len(params)
    for r in range(n):
        for j in owned[r]:
            res[j] = next(pieces).view(updates[j].shape)
    return res  # type: ignore[return-value]


def _all_to_all(chunks: list[Tensor], in_splits: list[int], out_splits: list[int], dtype, device, group) -> Tensor:
    send = torch.cat(chunks) if chunks else torch.empty(0, dtype=dtype, device=device)
    recv = torch.empty(sum(out_splits), dtype=dtype, device=device)
    dist.all_to_all_single(recv, send, out_splits, in_splits, group=group)
    return recv


def _ns_fallback(p: Tensor, update: Tensor, ns: NSSpec, dtype: torch.dtype | None) -> Tensor:
    from torch.distributed.tensor import DTensor, distribute_tensor

    u = DTensor.from_local(update, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
    o = ns(u.full_tensor(), dtype)
    return distribute_tensor(o, p.device_mesh, p.placements, src_data_rank=None).to_local()
