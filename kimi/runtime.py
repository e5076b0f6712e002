"""Where a job runs: device, process group, mesh, precision, and the few collectives the loop needs.

At world size 1 every collective here is a no-op, so `kimi.train` has one code path.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kimi.config import Config

# Dense bf16 peak of common accelerators, for the MFU estimate (FLOP/s).
_GPU_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


def peak_flops(device: torch.device) -> float:
    """Peak FLOP/s of one device, for MFU. CPU: cores x ~32 fp32 FLOP/cycle (AVX2 FMA) x clock,
    a rough upper bound that makes MFU comparable between runs, not across machines."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in _GPU_PEAK.items() if k in name), 0.0)
    try:
        import psutil

        freq = (psutil.cpu_freq().max or psutil.cpu_freq().current) * 1e6
    except Exception:
        freq = 2.5e9
    return torch.get_num_threads() * 32 * freq


@dataclass
class Runtime:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    amp_dtype: torch.dtype | None
    mesh: object | None  # kimi.parallel ParallelDims/DeviceMesh, None at world size 1
    dp_group: object | None  # process group of all data-parallel ranks (= world), None at world size 1

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

    def clip_grad_norm(self, params, max_norm: float) -> torch.Tensor:
        """Clip in place; the global norm before clipping as a device scalar (no host sync here)."""
        from kimi.optim.grad_clip import clip_grad_norm_

        return clip_grad_norm_(list(params), max_norm if max_norm > 0 else float("inf"))

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
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.barrier()


def setup_runtime(cfg: Config) -> Runtime:
    """Device and process group from the environment (torchrun sets RANK/WORLD_SIZE/LOCAL_RANK)."""
    from kimi.parallel import ParallelDims, build_mesh, init_distributed

    want = cfg.train.device
    use_cuda = torch.cuda.is_available() if want == "auto" else want == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is visible; use --train.device=cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    dims = ParallelDims.from_config(cfg.parallel, world, cfg.model.moe.num_experts if cfg.model.moe.use_moe else 0)
    rank, mesh, dp_group = 0, None, None
    if world > 1:
        rank, world, local_rank = init_distributed(cfg.parallel.backend, "cuda" if use_cuda else "cpu")
        mesh = build_mesh(dims, device.type)
        dp_group = dist.group.WORLD  # every rank is a data-parallel rank (EP borrows from FSDP's ranks)
    if dtype_is_bf16(cfg, use_cuda):
        amp = torch.bfloat16
    else:
        amp = None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(rank, world, local_rank, device, amp, mesh, dp_group)


def dtype_is_bf16(cfg: Config, use_cuda: bool) -> bool:
    # CPU default stays fp32: bf16 autocast measured no faster on this project's CPU (docs/training.md).
    return cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and use_cuda)
