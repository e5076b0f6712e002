"""One spawned rank of a benchmark: the torchrun environment, a process group over a file store, teardown.

with bench_rank(rank, world, store_dir):   # inside an mp.spawn target
    train(...)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist


@contextmanager
def bench_rank(rank: int, world: int, store_dir: str, threads: int = 1, timeout_s: float = 600) -> Iterator[None]:
    """Set RANK/WORLD_SIZE/LOCAL_RANK as torchrun would, `threads` intra-op threads, and join a `world`-rank group
    (NCCL on CUDA, gloo otherwise) through `store_dir`/store; the group is destroyed on the way out."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(threads)
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", init_method=f"file://{store_dir}/store", rank=rank,
                            world_size=world, timeout=timedelta(seconds=timeout_s))  # fmt: skip
    try:
        yield
    finally:
        dist.destroy_process_group()
