"""Expert parallelism: experts sharded along E over an EP group, tokens moved by all-to-all.

Shape legend (suffixes on tensor names):
    T  tokens on this rank            D  model dim            K  experts per token (top-k)
    N  routed rows on this rank (T*K)  E  experts (global)     L  local experts (E / R)
    R  ranks in the EP group           M  rows this rank receives (sum over sources, its L experts)

One MoE layer, on every rank of the EP group (dropless; differentiable end to end):

    topk_idx_TK --sort by expert--> x_ND (rows grouped by expert, hence by owner rank, since rank r owns
    experts [r*L, (r+1)*L)) --all_to_all(counts_E)--> how many rows each source sends each local expert
    --one host sync: the split sizes--> all_to_all(x_ND) --> x_MD in (source, local expert) order
    --reorder--> local-expert-major --experts(x, counts_L): one grouped matmul--> reorder back
    --all_to_all back--> y_ND in our sorted order --> un-permute, weight by topk_w, sum over k --> y_TD
(on the torch path each row's topk_w travels with it, and the experts weight their SwiGLU product instead)

The model (kimi/model/moe.py) calls `dispatcher(x_TD, topk_idx_TK, topk_w_TK, experts)`; this file only
replaces that seam and the experts' parameters, from outside the model.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from kimi.model.moe import RowWeights, dispatch_steps, rows_weights, scatter_rows


def _as_group(group: dist.ProcessGroup | DeviceMesh) -> dist.ProcessGroup:
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(f"the EP mesh must be 1-D, got a {group.ndim}-D mesh {group.mesh_dim_names}")
        return group.get_group()
    return group


class AllToAllDispatcher:
    """The MoE dispatcher seam for expert parallelism over `group` (a ProcessGroup or a 1-D DeviceMesh).

    `dispatcher(x_TD, topk_idx_TK, topk_w_TK, experts) -> y_TD` with `topk_idx_TK` in global expert ids
    [0, num_experts) and `experts` holding this rank's L = num_experts / R experts (plain tensors or
    DTensor Shard(0) over the EP mesh, see `apply_expert_parallel`). Every rank of the group must call it
    (it is a collective), with any T including 0. A plain callable, like the model's LocalDispatcher.
    """

    def __init__(self, group: dist.ProcessGroup | DeviceMesh, num_experts: int, kernels: str = "torch"):
        self.group = _as_group(group)
        self.kernels = kernels  # moe.kernels: the permute / un-permute steps are the model's, torch or Triton
        self.ep_size = dist.get_world_size(self.group)
        if num_experts % self.ep_size != 0:
            raise ValueError(f"moe.num_experts={num_experts} must be divisible by parallel.ep={self.ep_size}")
        self.num_experts = num_experts
        self.num_local = num_experts // self.ep_size
        # Forward all-to-all traffic since the trainer last read it (bytes sent by this rank, both
        # directions). With `profile` on, the collectives are waited for and timed (adds syncs: benches only).
        self.profile = False
        self.stats = {"a2a_bytes": 0, "a2a_s": 0.0}

    def __repr__(self) -> str:
        return f"AllToAllDispatcher(num_experts={self.num_experts}, ep={self.ep_size}, kernels={self.kernels!r})"

    def __call__(self, x_TD: Tensor, topk_idx_TK: Tensor, topk_w_TK: Tensor, experts: nn.Module) -> Tensor:
        K = topk_idx_TK.shape[1]
        R, L, E = self.ep_size, self.num_local, self.num_experts

        # 1. Permute locally to expert order with the model's own steps (stable sort; counts without a
        #    host sync). Rows for rank r's experts are now contiguous, in rank order.
        steps = dispatch_steps(self.kernels, x_TD.device)
        sort_idx_N, counts_E = steps.permute(topk_idx_TK, E)
        x_ND = steps.gather_rows(x_TD, sort_idx_N, K)

        # 2. Tell every rank how many rows of each of its experts we send: recv_counts_RL[s, l] = rows that
        #    source s sends to our local expert l. Small int tensor, even splits of L each.
        recv_counts_E = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_counts_E, counts_E, group=self.group)
        recv_counts_RL = recv_counts_E.view(R, L)

        # 3. THE host sync of this layer: the all-to-all needs its split sizes as Python ints. One .tolist()
        #    of [rows we send to each rank (R), rows we receive from each rank (R)].
        splits = torch.cat([counts_E.view(R, L).sum(1), recv_counts_RL.sum(1)]).tolist()
        send_splits, recv_splits = splits[:R], splits[R:]
        M = sum(recv_splits)

        # 4. Tokens to their experts' owners (uneven splits; autograd runs the reverse all-to-all).
        t0 = time.perf_counter()
        x_MD = self._waited(all_to_all_single_autograd(x_ND, recv_splits, send_splits, self.group))
        a2a_s = time.perf_counter() - t0

        # 5. Received rows come grouped by (source, local expert); the grouped matmul wants expert-major
        #    (local expert, source). A stable sort of the key l*R + s over the rows does it, on device.
        seg_M = torch.repeat_interleave(torch.arange(R * L, device=x_TD.device), recv_counts_E, output_size=M)
        order_M = torch.argsort((seg_M % L) * R + seg_M // L, stable=True)
        counts_L = recv_counts_RL.sum(0)
        row_weights = None
        if steps.combine is not None:  # the torch path: rows travel with their weights, the experts apply them
            w_N = rows_weights(topk_w_TK, sort_idx_N)
            w_M = all_to_all_single_autograd(w_N, recv_splits, send_splits, self.group).index_select(0, order_M)
            row_weights = RowWeights(w_M)
        gather = lambda x: x.index_select(0, order_M)  # noqa: E731 (see GroupedExperts.recompute)
        y_MD = experts(x_MD, counts_L, gather=gather, row_weights=row_weights)
        y_MD = scatter_rows(y_MD, order_M)  # undo the reorder

        # 6. Results back to the ranks that own the tokens; un-permute, weight, sum over K: the model's own
        #    combine step, so EP and single-device outputs round identically.
        t1 = time.perf_counter()
        y_ND = self._waited(all_to_all_single_autograd(y_MD, send_splits, recv_splits, self.group))
        if self.kernels != "torch":
            y_ND = wait_tensor(y_ND)  # Triton launchers need the plain tensor, not the collective's async wrapper
        weight_bytes = sum(send_splits) * 4 if row_weights is not None else 0  # fp32 weights, outbound only
        self.stats["a2a_bytes"] += (sum(send_splits) + M) * x_TD.shape[1] * x_ND.element_size() + weight_bytes
        if self.profile:
            self.stats["a2a_s"] += a2a_s + time.perf_counter() - t1
        if x_TD.shape[0] == 0:
            # unpermute cannot view 0 rows as (0, K, -1). Keep y_ND in the graph all the same: this rank
            # must still join the backward all-to-alls, or its peers wait for it forever.
            return (x_TD.new_zeros(x_TD.shape) + (y_ND.sum() + topk_w_TK.sum()) * 0).to(x_TD.dtype)
        if steps.combine is not None:
            return steps.combine(y_ND, sort_idx_N, K).to(x_TD.dtype)
        return steps.unpermute(y_ND, sort_idx_N, topk_w_TK).to(x_TD.dtype)

    def _waited(self, t: Tensor) -> Tensor:
        return wait_tensor(t) if self.profile else t


# ----------------------------------------------------------------------------- the experts' parameters

_LOCAL_VIEW_CLASSES: dict[type, type] = {}


def _local_view_class(cls: type) -> type:
    """A subclass of `cls` whose forward sees the local shards of its DTensor parameters.

    The model's GroupedExperts is single-device code: it reads `self.w1.shape[0]` as its expert count and
    multiplies plain tensors. Under EP its parameters are DTensors (global shape (E, F, D), Shard(0)), which
    is what state_dict / DCP must see so checkpoints reshard across EP degrees. For the duration of forward
    we put the differentiable `to_local()` views in their place (grads flow back into the DTensor's local
    shard) and restore the DTensors in a `finally`. Doing it inside forward, rather than in forward hooks,
    nests it correctly inside FSDP2's pre/post-forward hooks (which all-gather and swap parameters
    themselves) whatever order the hooks were registered in. FSDP2 uses the same dynamic-subclass trick.
    """
    if cls not in _LOCAL_VIEW_CLASSES:

        def forward(self, *args, **kwargs):
            saved = {n: p for n, p in self._parameters.items() if isinstance(p, DTensor)}
            try:
                for n, p in saved.items():
                    # Direct dict write: nn.Module.__setattr__ would reject a non-Parameter tensor here.
                    self._parameters[n] = p.to_local()
                return cls.forward(self, *args, **kwargs)
            finally:
                self._parameters.update(saved)

        _LOCAL_VIEW_CLASSES[cls] = type(f"EP{cls.__name__}", (cls,), {"forward": forward})
    return _LOCAL_VIEW_CLASSES[cls]


def shard_experts(experts: nn.Module, ep_mesh: DeviceMesh, num_experts: int) -> None:
    """Turn `experts`' parameters (all stacked along dim 0 = experts) into DTensor Shard(0) over `ep_mesh`.

    The values are broadcast from the mesh's first rank (distribute_tensor's default), so ranks that built
    the model from different seeds still agree; meta-device parameters are sharded without communication.
    """
    for name, p in list(experts.named_parameters(recurse=False)):
        if isinstance(p, DTensor):
            raise ValueError(f"expert parameter '{name}' is already a DTensor; apply expert parallelism once")
        if p.shape[0] != num_experts:
            raise ValueError(f"expert parameter '{name}' has shape {tuple(p.shape)}; dim 0 should be {num_experts}")
        src = None if p.is_meta else 0
        dt = distribute_tensor(p.detach(), ep_mesh, [Shard(0)], src_data_rank=src)
        setattr(experts, name, nn.Parameter(dt, requires_grad=p.requires_grad))
    experts.__class__ = _local_view_class(type(experts))


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh, profile: bool = False) -> None:
    """Shard every MoE layer's experts over the 1-D `ep_mesh` and install the all-to-all dispatcher.

    `model.moe_layers()` yields the MoE modules (each with `.experts` and a `.dispatcher` seam). Call before
    activation checkpointing, torch.compile and FSDP2 (`parallelize` does). In-place. `profile` times the
    all-to-alls (train.profile: adds device syncs, for benches).
    """
    ep = ep_mesh.size()
    for moe in model.moe_layers():
        num_experts = moe.num_experts
        if num_experts % ep != 0:
            raise ValueError(f"moe.num_experts={num_experts} must be divisible by parallel.ep={ep}")
        shard_experts(moe.experts, ep_mesh, num_experts)
        moe.dispatcher = AllToAllDispatcher(ep_mesh, num_experts, moe.cfg.kernels)
        moe.dispatcher.profile = profile
