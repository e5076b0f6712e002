"""Where a job runs: device, process group, mesh, precision, and the few collectives the loop needs.

At world size 1 every collective here is a no-op, so `kimi.train` has one code path.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kimi.config import KimiConfig, ParallelConfig, TrainConfig
from kimi.host_memory import keep_freed_memory

# Dense bf16 peak of common accelerators, for the MFU estimate (FLOP/s).
_GPU_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


def datasheet_peak_flops(device: torch.device) -> float:
    """Dense bf16 datasheet peak of one GPU (0.0 when unknown, and on CPU, which has no such figure)."""
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _GPU_PEAK.items() if k in name), 0.0)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int | None = None, reps: int = 5) -> float:
    """Best FLOP/s of an n x n x n matmul (2 n^3 FLOPs) over `reps` timed runs after one warm-up."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = sync_time(device)
        a @ b
        best = min(best, sync_time(device) - t0)
    return 2 * n**3 / best


def sync_time(device: torch.device) -> float:
    """perf_counter after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class Runtime:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    amp_dtype: torch.dtype | None
    mesh: object | None  # kimi.parallel ParallelDims/DeviceMesh, None at world size 1
    dp_group: object | None  # process group of all data-parallel ranks (= world), None at world size 1
    owns_group: bool = False  # the one-process group at world size 1 was made here (setup_runtime)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def print(self, msg: str) -> None:
        if self.is_main:
            print(msg, flush=True)

    # Collectives (no-ops at world size 1) ---------------------------------------------
    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.dp_group)
        return t

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.dp_group)
            t /= self.world
        return t

    def agree_on_step(self, loss: torch.Tensor, grad_norm: torch.Tensor, flag: bool) -> tuple[float, float, bool, bool]:
        """What every rank needs to know before it applies a step, from one SUM all-reduce and one host
        sync: (mean of `loss` over ranks, this rank's `grad_norm`, whether any rank raised `flag`, whether
        the grad norm is finite on every rank). A NaN/inf loss on any rank makes the mean non-finite. The
        norm is global already (clip_grad_norm_ reduces it); its finiteness is reduced anyway, so the
        ranks agree on skipping a step even where an engine's norm is rank-local."""
        dev = loss.device
        norm = grad_norm.detach().float().reshape(1).to(dev)
        t = torch.stack([loss.detach().float(), torch.tensor(float(flag), device=dev), (~norm.isfinite()).float()[0]])
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.dp_group)
        t = t / torch.tensor([self.world, 1.0, 1.0], device=dev)
        mean, raised, bad_norms, norm_ = torch.cat([t, norm]).tolist()  # the local norm rides along unreduced
        return mean, norm_, raised > 0, bad_norms == 0

    def max_logit_stats(self, model) -> dict:
        """Max attention logit of this step when QK-clip is off (for logging only)."""
        layers = model.attention_layers()
        maxima = [m.max_logits_H for m in layers if hasattr(m, "max_logits_H")]
        if not maxima:
            return {}
        m = self.all_reduce_max(torch.stack(maxima).max().detach().clone())
        for layer in layers:
            layer.reset_max_logits()
        return {"max_logit": m.item(), "clipped_heads": 0}

    def sync_time(self) -> float:
        """perf_counter after the device has finished its queued work (for profiling only)."""
        return sync_time(self.device)

    def autocast(self):
        """The forward's precision context: bf16 autocast when train.dtype asks for it, else fp32."""
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def shutdown(self) -> None:
        """End of a run: ranks wait for each other; a one-process group this runtime made goes with it."""
        if self.owns_group:
            self.release_group()
        elif dist.is_initialized():
            dist.barrier()

    def release_group(self) -> None:
        """Destroy the one-process group made for an engine that needs one (safe on any exit path: no
        peer to wait for), so the next run in this Python process starts from none, as a fresh one would."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False


def setup_runtime(
    train: TrainConfig, parallel: ParallelConfig, model: KimiConfig, group_at_world_1: bool = False
) -> Runtime:
    """Device and process group from the environment (torchrun sets RANK/WORLD_SIZE/LOCAL_RANK).
    `model` says how many experts the mesh's ep must divide; `group_at_world_1` creates a one-process group
    (in-memory store) when the engine needs one even alone (kimi.engine.Engine.needs_process_group)."""
    from kimi.parallel import ParallelDims, build_mesh, init_distributed

    want = train.device
    use_cuda = torch.cuda.is_available() if want == "auto" else want == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is visible; use --train.device=cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if not use_cuda and train.cpu_keep_freed_memory:
        keep_freed_memory()
    dims = ParallelDims.for_model(parallel, model, world)
    rank, mesh, dp_group, owns_group = 0, None, None, False
    if world > 1:
        rank, world, local_rank = init_distributed(parallel.backend, "cuda" if use_cuda else "cpu", parallel.timeout_s)
        mesh = build_mesh(dims, device.type, parallel.timeout_s)
        dp_group = dist.group.WORLD  # every rank is a data-parallel rank (EP borrows from FSDP's ranks)
    elif group_at_world_1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
        owns_group = True
        for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", str(local_rank))):
            os.environ.setdefault(k, v)  # DeepSpeed reads the launcher's variables even then
    # CPU default stays fp32: bf16 autocast measured no faster on this project's CPU (docs/training.md).
    amp = torch.bfloat16 if train.dtype == "bf16" or (train.dtype == "auto" and use_cuda) else None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(rank, world, local_rank, device, amp, mesh, dp_group, owns_group)
