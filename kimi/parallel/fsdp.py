"""FSDP2 (fully_shard) over the model's blocks, with expert weights sharded on their own, smaller mesh.

Dense parameters: one FSDP group per Block, plus the root (embedding, final norm, head), sharded over
`fsdp` (all dp_shard ranks), or HSDP over (dp_replicate, fsdp). Gradients are averaged over every rank:
the loss each rank backpropagates is the mean over its own tokens, so the average is the gradient of the
global mean loss.

Expert parameters under EP are already DTensors split by expert over `ep`; FSDP shards them further over
`efsdp` = dp_shard_mod_ep (x dp_replicate): the ranks holding the same experts. Their gradient needs care:
a rank's experts processed tokens from all `ep` ranks of its group, so its local expert gradient is already
the SUM over those ep ranks' losses. FSDP's default average over the W/ep ranks of efsdp would leave the
gradient ep times too large; dividing by W (the data-parallel world) instead gives exactly the gradient of
the global mean loss (torchtitan sets the same factor). The tests check this against one process.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard


def mixed_precision(device_type: str, dtype: str = "auto") -> MixedPrecisionPolicy:
    """bf16 parameters / fp32 gradient reduction on GPU ("auto" or "bf16"); fp32 throughout on CPU ("auto")."""
    bf16 = dtype == "bf16" or (dtype == "auto" and device_type == "cuda")
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)


def shard_experts_fsdp(
    experts: nn.Module, efsdp_mesh: DeviceMesh, data_world_size: int, mp: MixedPrecisionPolicy
) -> None:
    """fully_shard the (EP-sharded) `experts` over `efsdp_mesh` with the gradient divide factor set to the
    data-parallel world size (see the module docstring)."""
    shard_size = efsdp_mesh.size(-1)  # the FSDP-shard dim (the last one when the mesh is 2-D HSDP)
    local_experts = next(iter(experts.parameters())).to_local().shape[0]

    def placement(p: nn.Parameter) -> Shard:
        # Whole experts per rank when they divide evenly (each shard keeps whole matrices, which Muon and
        # the grouped matmul's layout like); otherwise shard the hidden dim, as torchtitan does, instead of
        # leaving some ranks empty.
        return Shard(0) if local_experts % shard_size == 0 else Shard(1)

    fully_shard(experts, mesh=efsdp_mesh, mp_policy=mp, shard_placement_fn=placement)
    experts.set_gradient_divide_factor(float(data_world_size))
    if efsdp_mesh.device_type != "cuda" and shard_size > 1:
        # A divide factor other than the group size makes FSDP use PREMUL_SUM, which gloo lacks: sum, then
        # divide. (Not on a size-1 shard group: torch 2.13 would divide twice there.)
        experts.set_force_sum_reduction_for_comms(True)


def apply_fsdp(
    model: nn.Module,
    dense_mesh: DeviceMesh,
    expert_mesh: DeviceMesh,
    data_world_size: int,
    mp: MixedPrecisionPolicy,
    reshard_after_forward: bool = True,
) -> None:
    """fully_shard bottom-up: EP-sharded experts (own group, `expert_mesh`), each Block (`dense_mesh`), the
    root. `model.layers` may hold activation-checkpoint wrappers; they are sharded as the block."""
    for block in model.layers:
        for module in block.modules():
            params = list(module.parameters(recurse=False))
            if params and all(isinstance(p, DTensor) for p in params):  # experts split by apply_expert_parallel
                shard_experts_fsdp(module, expert_mesh, data_world_size, mp)
        fully_shard(block, mesh=dense_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    # The root's parameters (embedding, norm, head) are needed first in backward: keep them gathered.
    fully_shard(model, mesh=dense_mesh, mp_policy=mp, reshard_after_forward=False)
