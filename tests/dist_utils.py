"""Run a function on N gloo CPU ranks from inside a pytest test.

    def _body(rank, world_size, tmp):      # module-level, so spawn can pickle it
        ...assert things...; return something_small

    results = run_distributed(_body, world_size=2, args=(tmp,))   # [rank0's return, rank1's return]

Each rank is a fresh process (torch.multiprocessing spawn) with the torchrun environment variables set
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT on a free port, for code that calls
`init_distributed` itself with init_pg=False), one CPU thread, and otherwise a gloo process group (60 s
timeout, rendezvous through a file in a fresh temp dir) already initialised. If any rank raises, the others are killed and the
test fails with that rank's traceback. Return values travel back through torch.save files.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class RankFailed(RuntimeError):
    """A spawned rank raised; the message carries its traceback."""


def free_port() -> int:
    # The port is released before the ranks bind it; another process could grab it in between, but the
    # window is microseconds and a clash shows up as a clear "address in use", not a wrong answer.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int, world_size: int, port: int, out_dir: str, fn: Callable[..., Any], args: tuple, init_pg: bool
) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)  # N ranks share a couple of cores; more threads only thrash
    try:
        if init_pg:
            # A FileStore in the run's own temp dir: no rendezvous port to race other processes for.
            store = f"file://{os.path.join(out_dir, 'store')}"
            dist.init_process_group(
                "gloo", init_method=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
            )
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException as e:
        # A failing rank's peers fail next ("connection closed by peer"), and spawn reports whichever it sees
        # first. Stamp each failure with its time so the parent can report the root cause: the earliest one.
        msg = f"rank {rank} of {world_size} failed:\n{traceback.format_exc()}"
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(f"{time.time()!r}\n{msg}")
        raise RankFailed(msg) from e
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _first_failure(out_dir: str, world_size: int) -> str | None:
    failures = []
    for r in range(world_size):
        path = os.path.join(out_dir, f"rank{r}.err")
        if os.path.exists(path):
            stamp, _, msg = open(path).read().partition("\n")
            failures.append((float(stamp), r, msg))
    if not failures:
        return None
    failures.sort()
    others = [r for _, r, _ in failures[1:]]
    also = f"\n(ranks {others} failed after it, probably because of it)" if others else ""
    return failures[0][2] + also


def run_distributed(
    fn: Callable[..., Any], world_size: int, args: tuple = (), init_pg: bool = True, timeout: float = 120.0
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` processes; return each rank's result (rank order).

    `fn` must be picklable (a module-level function). `init_pg=False` leaves process-group creation to `fn`
    (to test `init_distributed` itself). Raises `RankFailed` with the failing rank's traceback, or
    `TimeoutError` if the ranks are still running after `timeout` seconds (then they are killed).
    """
    with tempfile.TemporaryDirectory(prefix="kimi_dist_") as out_dir:
        ctx = mp.start_processes(
            _worker,
            args=(world_size, free_port(), out_dir, fn, args, init_pg),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        try:
            # join() returns False while ranks are still running and raises on the first failure, after
            # terminating the others (so a rank stuck in a collective with a dead peer does not hang us).
            deadline = time.monotonic() + timeout
            while not ctx.join(timeout=0.5):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world_size} ranks still running after {timeout:.0f} s")
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            raise RankFailed(_first_failure(out_dir, world_size) or str(e)) from None
        finally:
            for p in ctx.processes:  # only our own children, by handle
                if p.is_alive():
                    p.terminate()
                p.join(5)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
