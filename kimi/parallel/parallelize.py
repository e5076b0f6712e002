"""`parallelize`: apply EP, activation checkpointing, torch.compile (of blocks or of their elementwise chains)
and FSDP2 to a KimiModel, in that order.

The order matters: expert parallelism first (it replaces expert parameters by DTensors and installs the
all-to-all dispatcher, both of which the later steps must see), checkpointing wraps each Block so its
recomputation includes the all-to-alls, compile goes inside FSDP so FSDP's hooks stay outside the graph,
and FSDP2 last, bottom-up. Module names (and so state_dict / checkpoint keys) are unchanged by all four:
`nn.Module.compile()` compiles in place, and checkpoint_wrapper strips its prefix from state_dicts.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh

from kimi.config import ConfigError, ParallelConfig, TrainConfig
from kimi.model.elementwise import ELEMENTWISE, Elementwise
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


def apply_fused_elementwise(model: nn.Module, backend: str = "inductor") -> None:
    """train.fused_elementwise: each module that runs the block's elementwise chains through its
    `elementwise` attribute (RMSNorm, SwiGLU MLPs, the routed experts) gets torch.compile'd copies of them:
    one fused kernel each for forward and for backward, every matmul still eager. In place; module tree,
    parameters and state_dict keys are unchanged. Inductor builds its CPU kernels with a C++ compiler: without
    one this fails here, in one line, rather than at the first forward."""
    if backend == "inductor" and any(p.device.type == "cpu" for p in model.parameters()):
        _require_cpp_compiler()
    fused = fused_elementwise(backend)
    for module in model.modules():
        if isinstance(getattr(module, "elementwise", None), Elementwise):
            module.elementwise = fused


def _require_cpp_compiler() -> None:
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as e:  # inductor's InvalidCxxCompiler, or whatever its search raises
        raise ConfigError(
            f"train.fused_elementwise=true compiles CPU kernels, and no C++ compiler was found ({type(e).__name__}): "
            "install g++ (or set CXX), or set --train.fused_elementwise=false"
        ) from None


@functools.cache
def fused_elementwise(backend: str) -> Elementwise:
    """ELEMENTWISE's functions compiled, shared by every module (one compile per shape, not per module).
    Static shapes (dynamic=False): one kernel per shape (train and eval, MLA's latent norm beside the model
    width), which fixed-length training stays well inside; the automatic-dynamic kernels torch.compile makes
    on a shape change were slower here."""
    return Elementwise(*(torch.compile(fn, backend=backend, dynamic=False) for fn in ELEMENTWISE))


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
    elif train_cfg.fused_elementwise:  # compiled blocks fuse these chains already
        apply_fused_elementwise(model, compile_backend)
    if mesh is not None:
        mp = mixed_precision(mesh.device_type, train_cfg.dtype)
        apply_fsdp(model, submesh(mesh, "hsdp"), submesh(mesh, "efsdp"), dims.world_size, mp)
    return model
