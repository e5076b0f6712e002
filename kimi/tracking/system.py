"""What the machine is doing (CPU, memory, GPU memory) and where the run came from (git, host, versions).

Both are read from the tracker's background thread, so nothing here is on the training hot path.
System samples go to MLflow only, not to metrics.jsonl: that file holds exactly what the trainer logged.
"""

from __future__ import annotations

import os
import platform
import socket
import sys
from pathlib import Path

import psutil

from kimi.files import git_state

_GB = 1024**3


class SystemSampler:
    """`sample()` -> {"system/cpu_percent", "system/rss_gb", ["system/gpu_mem_*_gb"]}.

    cpu_percent is machine-wide, averaged since the previous sample (psutil's non-blocking form; the
    constructor primes it so the first sample is meaningful). rss_gb counts this process and all its
    children (dataloader workers, compile workers). GPU memory is torch's caching-allocator view of
    `device` (allocated = live tensors, reserved = held by the cache), present only when CUDA is.
    """

    def __init__(self) -> None:
        self._proc = psutil.Process(os.getpid())
        psutil.cpu_percent(interval=None)
        self.cuda_device: int | None = None  # set from the training thread: CUDA's current device is per thread

    def sample(self) -> dict[str, float]:
        out = {"system/cpu_percent": psutil.cpu_percent(interval=None), "system/rss_gb": self._rss_bytes() / _GB}
        torch = sys.modules.get("torch")  # never import torch just for this: the trainer already has
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            dev = self.cuda_device if self.cuda_device is not None else torch.cuda.current_device()
            out["system/gpu_mem_allocated_gb"] = torch.cuda.memory_allocated(dev) / _GB
            out["system/gpu_mem_reserved_gb"] = torch.cuda.memory_reserved(dev) / _GB
        return out

    def _rss_bytes(self) -> int:
        total = 0
        for p in [self._proc, *self._proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass  # a child that just exited
        return total


def current_cuda_device() -> int | None:
    """The calling thread's CUDA device if CUDA is in use already, else None (cheap; never initialises CUDA)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.current_device()
    return None


def provenance_tags() -> dict[str, str]:
    """Tags that say which code ran where: git commit (+ dirty flag), host, python/torch/CUDA versions."""
    tags = {
        "host": socket.gethostname(),
        "python_version": platform.python_version(),
        "mlflow.source.name": " ".join(sys.argv)[:500] or "python",
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        tags["torch_version"] = torch.__version__
        if torch.version.cuda:
            tags["cuda_version"] = torch.version.cuda
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # asking for the name would initialise CUDA
            tags["gpu"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    commit, dirty = git_state(Path(__file__).resolve().parent)
    if commit:
        tags["mlflow.source.git.commit"] = commit  # the tag MLflow's UI shows as the run's source version
        tags["git_commit"] = commit
        tags["git_dirty"] = str(dirty).lower()
    return tags
