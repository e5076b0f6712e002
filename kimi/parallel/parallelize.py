"""`parallelize`: apply EP, activation checkpointing, torch.compile and FSDP2 to a KimiModel, in that order.

The order matters: expert parallelism first (it replaces expert parameters by DTensors and installs the
all-to-all dispatcher, both of which the later steps must see), checkpointing wraps each Block so its
recomputation includes the all-to-alls, compile goes inside FSDP so FSDP's hooks stay outside the graph,
and FSDP2 last, bottom-up. Module names (and so state_dict / checkpoint keys) are unchanged by all four:
`nn.Module.compile()` compiles in place, and checkpoint_wrapper strips its prefix from state_dicts.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh

from kimi.config import ParallelConfig, TrainConfig
from kimi.parallel.expert_parallel import apply_expert_parallel
from kimi.parallel.fsdp import apply_fsdp, mixed_precision
from kimi.parallel.mesh import MESH_DIMS, ParallelDims, submesh


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each Block's activations in backward (non-reentrant torch.utils.checkpoint)."""
    for i, block in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(block)


def apply_compile(model: nn.Module, backend: str = "inductor") -> None:
    """torch.compile each Block in place (same module tree, so the same state_dict keys). The MoE
    all-to-all needs its split sizes on the host (one .tolist()), so an EP block compiles as two graphs
    around that graph break."""
    for block in model.layers:
        block.compile(backend=backend)


def parallelize(
    model: nn.Module,
    mesh: DeviceMesh | None,
    parallel_cfg: ParallelConfig,
    train_cfg: TrainConfig,
    compile_backend: str = "inductor",
) -> nn.Module:
    """Make `model` (a KimiModel on its device, same weights on every rank) ready for training on `mesh`.

    `mesh` is what `build_mesh` returned (None at world size 1: only checkpointing and compile apply).
    In-place; returns the model for convenience. After this, parameters are DTensors: use `p.full_tensor()`
    to see a whole one, and clip / step with DTensor-aware code. Every forward is collective under EP and
    FSDP: all ranks must run the same number of forwards (eval and generation included).
    `compile_backend` is for tests ("aot_eager" traces like inductor without the C++ codegen).
    """
    dims = ParallelDims.for_model(parallel_cfg, model.config, 1 if mesh is None else mesh.size())
    if mesh is not None:
        shape = (dims.dp_replicate, dims.dp_shard_mod_ep, dims.ep)
        if tuple(mesh.shape) != shape or mesh.mesh_dim_names != MESH_DIMS:
            raise ValueError(f"mesh {mesh.mesh_dim_names}={tuple(mesh.shape)} does not match parallel config {shape}")

    if dims.ep_enabled and model.moe_layers():
        apply_expert_parallel(model, submesh(mesh, "ep"), profile=train_cfg.profile)
    if train_cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if train_cfg.compile:
        apply_compile(model, compile_backend)
    if mesh is not None:
        mp = mixed_precision(mesh.device_type, train_cfg.dtype)
        apply_fsdp(model, submesh(mesh, "hsdp"), submesh(mesh, "efsdp"), dims.world_size, mp)
    return model
