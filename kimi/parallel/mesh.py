"""Process groups and the device mesh: how the world's ranks split into data / FSDP / expert parallelism.

Every rank is a data-parallel rank (EP ranks read different data): data rank = global rank, data world =
world size. The world is laid out as a 3-D mesh, innermost (fastest-varying, so intra-node) last:

    (dp_replicate, dp_shard_mod_ep, dp_shard_in_ep)      dp_shard = dp_shard_mod_ep * ep,  dp_shard_in_ep = ep

EP borrows its ranks from the FSDP dim, as in torchtitan: dense parameters are FSDP-sharded over all of
dp_shard (= dp_shard_mod_ep x ep), expert parameters are split over `ep` by expert and FSDP-sharded over
dp_shard_mod_ep only. Submeshes, built once and kept here (torch deprecates slicing flattened dims out of
the root mesh), are fetched with `submesh(mesh, name)`:

    dp     1-D, all W ranks (= the world): data loading, loss / metric averaging, routing counts
    fsdp   1-D, dp_shard ranks: dense FSDP2 sharding          hsdp   (dp_replicate, fsdp) if dp_replicate > 1
    ep     1-D, ep ranks: the all-to-all group                efsdp  dp_shard_mod_ep, or (dp_replicate, it)
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from kimi.config import ConfigError, KimiConfig, ParallelConfig

MESH_DIMS = ("dp_replicate", "dp_shard_mod_ep", "dp_shard_in_ep")


@dataclass
class ParallelDims:
    """Resolved and validated parallel degrees. `-1` means "the rest of the world" (at most one of them)."""

    dp_replicate: int
    dp_shard: int
    ep: int
    world_size: int
    num_experts: int | None = None  # when given, checked against ep

    def __post_init__(self) -> None:
        W = self.world_size
        if W < 1:
            raise ConfigError(f"world size {W} must be >= 1")
        for k in ("dp_replicate", "dp_shard"):
            v = getattr(self, k)
            if v == 0 or v < -1:
                raise ConfigError(f"parallel.{k}={v} must be >= 1, or -1 for the rest of the world")
        if self.ep < 1:
            raise ConfigError(f"parallel.ep={self.ep} must be >= 1")
        if self.dp_replicate == -1 and self.dp_shard == -1:
            raise ConfigError("parallel.dp_replicate and parallel.dp_shard are both -1; set one of them")
        if self.dp_shard == -1:
            if W % self.dp_replicate:
                raise ConfigError(f"world size {W} is not divisible by parallel.dp_replicate={self.dp_replicate}")
            self.dp_shard = W // self.dp_replicate
        elif self.dp_replicate == -1:
            if W % self.dp_shard:
                raise ConfigError(f"world size {W} is not divisible by parallel.dp_shard={self.dp_shard}")
            self.dp_replicate = W // self.dp_shard
        if self.dp_replicate * self.dp_shard != W:
            raise ConfigError(
                f"parallel.dp_replicate={self.dp_replicate} x parallel.dp_shard={self.dp_shard} != world size {W}; "
                "set one of them to -1 to fill the rest"
            )
        if self.dp_shard % self.ep:
            raise ConfigError(
                f"parallel.ep={self.ep} must divide parallel.dp_shard={self.dp_shard} (EP borrows its ranks from "
                "the FSDP dim)"
            )
        if self.num_experts is not None and self.ep > 1 and self.num_experts % self.ep:
            raise ConfigError(f"moe.num_experts={self.num_experts} must be divisible by parallel.ep={self.ep}")

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int, num_experts: int | None = None) -> ParallelDims:
        return cls(cfg.dp_replicate, cfg.dp_shard, cfg.ep, world_size, num_experts)

    @classmethod
    def for_model(cls, parallel_cfg: ParallelConfig, model_cfg: KimiConfig, world_size: int) -> ParallelDims:
        """from_config with the model's routed-expert count (which parallel.ep must divide); a dense model
        (moe.use_moe false) has none to check."""
        moe = model_cfg.moe
        return cls.from_config(parallel_cfg, world_size, moe.num_experts if moe.use_moe else None)

    @property
    def dp_shard_mod_ep(self) -> int:
        return self.dp_shard // self.ep

    @property
    def dp(self) -> int:
        """Data-parallel world: every rank."""
        return self.world_size

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    @property
    def hsdp(self) -> bool:
        return self.dp_replicate > 1


_SUBMESHES: dict[int, dict[str, DeviceMesh]] = {}  # id(root mesh) -> name -> submesh


def _group_options(timeout_s: float):
    """Backend options that carry `timeout_s`, for every group the mesh creates: without them DeviceMesh's
    subgroups get torch's 30-minute default, not the world group's timeout (a hung rank would hold an
    EP all-to-all that long). Gloo and NCCL each want their own Options class."""
    if dist.get_backend() == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts.is_high_priority_stream = False  # what new_group uses when given none
    else:
        opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timedelta(seconds=timeout_s)
    return opts


def build_mesh(dims: ParallelDims, device_type: str = "cpu", timeout_s: float = 600.0) -> DeviceMesh | None:
    """The 3-D world mesh (dims `MESH_DIMS`) with its submeshes registered; None at world size 1. Every
    group it creates times a collective out after `timeout_s` (parallel.timeout_s).

    Needs an initialised process group of `dims.world_size` ranks. All ranks must call it (it creates groups).
    """
    if dims.world_size == 1:
        return None
    if not dist.is_initialized() or dist.get_world_size() != dims.world_size:
        raise RuntimeError(f"build_mesh needs an initialised process group of {dims.world_size} ranks")
    shape = (dims.dp_replicate, dims.dp_shard_mod_ep, dims.ep)
    opts = _group_options(timeout_s)
    mesh = init_device_mesh(
        device_type, shape, mesh_dim_names=MESH_DIMS, backend_override=dict.fromkeys(MESH_DIMS, opts)
    )
    sub = {
        "dp": mesh[MESH_DIMS]._flatten("dp", opts),
        "fsdp": mesh[MESH_DIMS[1:]]._flatten("fsdp", opts),
        "ep": mesh["dp_shard_in_ep"]._flatten("ep", opts),
        "dp_replicate": mesh["dp_replicate"],
        "dp_shard_mod_ep": mesh["dp_shard_mod_ep"],
    }
    with warnings.catch_warnings():  # the one place we slice a flattened dim out of the root
        warnings.filterwarnings("ignore", message=".*flattened dim.*")
        sub["hsdp"] = mesh["dp_replicate", "fsdp"] if dims.hsdp else sub["fsdp"]
    sub["efsdp"] = mesh["dp_replicate", "dp_shard_mod_ep"] if dims.hsdp else sub["dp_shard_mod_ep"]
    _SUBMESHES[id(mesh)] = sub
    return mesh


def submesh(mesh: DeviceMesh, name: str) -> DeviceMesh:
    """A submesh of a mesh from `build_mesh`: 'dp', 'fsdp', 'ep', 'hsdp', 'efsdp' or a root dim name."""
    sub = _SUBMESHES.get(id(mesh))
    if sub is None:
        raise ValueError("submesh() takes the mesh returned by build_mesh")
    if name not in sub:
        raise ValueError(f"no submesh '{name}'; known: {', '.join(sorted(sub))}")
    return sub[name]


class DistInfo(NamedTuple):
    """What `init_distributed` found; unpacks as `rank, world_size, local_rank = init_distributed()`."""

    rank: int
    world_size: int
    local_rank: int


def init_distributed(backend: str = "auto", device: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Join the process group described by torchrun's env vars (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    Without them, or with WORLD_SIZE=1, no group is created and everything parallel becomes a no-op.
    backend "auto": NCCL when the device is CUDA, gloo on CPU. Idempotent if a group already exists.
    device "auto": CUDA when available; on CUDA this also sets the current device to LOCAL_RANK.
    """
    if backend not in ("auto", "nccl", "gloo"):
        raise ConfigError(f"parallel.backend={backend!r} is not one of 'auto', 'nccl', 'gloo'")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        if backend == "nccl" and dev.type != "cuda":
            raise ConfigError("parallel.backend='nccl' needs CUDA; use 'gloo' (or 'auto') on CPU")
        kw = {"device_id": dev} if dev.type == "cuda" else {}
        timeout = timedelta(seconds=timeout_s)
        if (store := round_store(world_size, timeout)) is not None:
            kw.update(store=store, rank=rank, world_size=world_size)
        dist.init_process_group(backend, timeout=timeout, **kw)
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world_size, local_rank)


def round_store(world_size: int, timeout: timedelta) -> dist.Store | None:
    """The store of this torchrun round, for `init_process_group`; None where torch's env:// is safe.

    torchrun's c10d rendezvous hosts one TCPStore in the agent and hands it to the workers of every round
    (TORCHELASTIC_USE_AGENT_STORE=True; torch 2.13 creates it once and never clears it), and env:// opens it
    without a per-round prefix. Every group (the world, the mesh's subgroups, DeepSpeed's clone of the
    world) publishes its ranks' gloo/NCCL addresses there under the same keys in every round. So after
    `--max-restarts` restarts the workers, a rank can read its peer's address from the dead round before
    the peer has rewritten it: "Connection refused" in connectFullMesh, or a connect to a port some new
    process reuses, which never answers (a hang until the timeout). The restart count prefixes every key,
    giving each round keys of its own.

    The count is per agent: on several nodes an agent that restarts for another node's failure does not
    count it (torch issue 135712), so the rounds' prefixes could differ. launch/multinode.sh and
    slurm/common.sh therefore set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: each round then gets a fresh store
    on a fresh port from global rank 0, env:// is safe, and this returns None."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")):
        warnings.warn(
            "torchrun shares one store across restarts and counts restarts per node; set "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun on several nodes (launch/multinode.sh and "
            "slurm/common.sh do), or a restart may not find its peers",
            stacklevel=2,
        )
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False, timeout=timeout
    )
    return dist.PrefixStore(f"kimi/restart_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
