"""Parallelism applied from outside the model: device mesh, FSDP2 / HSDP, expert parallelism (all-to-all).

info = init_distributed(cfg.parallel.backend)              # torchrun env; no group at world size 1
dims = ParallelDims.for_model(cfg.parallel, cfg.model, info.world_size)   # checks ep against the experts
mesh = build_mesh(dims, info.device.type)                  # None at world size 1
parallelize(model, mesh, cfg.parallel, cfg.train)          # EP -> checkpointing -> compile -> FSDP2
... step ...; update_router_bias(model)                    # global routing counts -> same bias everywhere
"""

from kimi.parallel.expert_parallel import AllToAllDispatcher, apply_expert_parallel
from kimi.parallel.mesh import DistInfo, ParallelDims, build_mesh, init_distributed, submesh
from kimi.parallel.parallelize import parallelize
from kimi.parallel.routing import all_reduce_routing_counts, update_router_bias

__all__ = [
    "AllToAllDispatcher",
    "DistInfo",
    "ParallelDims",
    "all_reduce_routing_counts",
    "apply_expert_parallel",
    "build_mesh",
    "init_distributed",
    "parallelize",
    "submesh",
    "update_router_bias",
]
