"""python -m kimi.bench checkpoint [--config configs/nano.yaml] [--saves 3] [--interval 8] [--rounds 2]
                                 [--worlds 1,2,4] [--json out.json] [--quick] [--section.key=value ...]

How long a checkpoint save holds the training loop, measured by the trainer itself (kimi.train.train, the
engine and kimi.checkpoint in the path; Checkpointer.timings, read through Hooks.on_build):
  sync vs async   one process, `train.async_checkpoint` false and true, interleaved over --rounds runs of
                  --saves saves each, --interval steps apart. Blocked = the time save() held the loop: for
                  a synchronous save the write, hashing and publishing; for an async one the staging (a copy
                  of the state in host memory) and the small files, plus any wait for the previous save still
                  being written ("waited", reported apart: it is 0 when the interval leaves the background
                  write time enough). The first save of each run is reported apart (async: it allocates the
                  host copy later saves reuse, and makes the writer's process group); the last is left out:
                  a run's end waits for it.
  world size      synchronous saves at each world size in --worlds (gloo ranks on this machine, the same
                  global batch): the save time, the time this rank spent hashing its share of the files,
                  and, for comparison, one process hashing all of them (what rank 0 alone did before).
Synthetic tokens (data.dataset=toy), one micro-batch of 32 tokens per rank (the model's size, not the step,
sets a checkpoint's cost). Numbers for docs/benchmarking.md, never for tests.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from kimi.bench.ranks import bench_rank
from kimi.bench.tables import md_table, save_json
from kimi.config import load_config

QUICK_CONFIG = "configs/debug.yaml"
TIMINGS = "bench_checkpoint_timings.json"


def add_args(p) -> None:
    p.add_argument(
        "--saves", type=int, default=4, help="checkpoint: saves per run (the first apart, the last not counted)"
    )
    p.add_argument("--interval", type=int, default=8, help="checkpoint: steps between saves")
    p.add_argument("--rounds", type=int, default=2,
                   help="checkpoint: sync/async run pairs, interleaved; ns: passes over all variants, interleaved; "
                   "throughput: runs per model, interleaved")  # fmt: skip


def _overrides(overrides: list[str], out: Path, saves: int, interval: int, world: int) -> list[str]:
    return [
        "--data.dataset=toy",
        f"--train.global_batch_size={world}",
        "--train.micro_batch_size=1",
        "--data.block_size=32",
        *overrides,
        f"--train.out_dir={out}",
        f"--train.max_steps={saves * interval}",
        f"--train.ckpt_interval={interval}",
        "--train.eval_interval=0",
        "--train.resume=false",
        "--train.log_interval=1000000",
        "--logging.mlflow=false",
    ]


def _train(config: str, overrides: list[str]) -> list[dict]:
    """One run of the real trainer; the Checkpointer's timings of its saves."""
    from kimi.train import Hooks, train

    seen = {}
    train(load_config(config, overrides), hooks=Hooks(on_build=lambda t: seen.setdefault("trainer", t)))
    return seen["trainer"].checkpointer.timings


def _rank_main(rank: int, world: int, out: str, config: str, overrides: list[str]) -> None:
    with bench_rank(rank, world, out):
        timings = _train(config, overrides)
        if rank == 0:
            Path(out, TIMINGS).write_text(json.dumps(timings))


def sync_vs_async(config: str, overrides: list[str], saves: int, interval: int, rounds: int) -> dict:
    runs: dict[str, list[list[dict]]] = {"sync": [], "async": []}
    for _ in range(rounds):
        for mode in runs:
            out = Path(tempfile.mkdtemp(prefix="kimi-bench-ckpt-"))
            args = [*_overrides(overrides, out, saves, interval, 1), f"--train.async_checkpoint={mode == 'async'}"]
            try:
                runs[mode].append(_train(config, args)[:-1])  # the run's last save is waited for: not counted
            finally:
                shutil.rmtree(out, ignore_errors=True)
    res = {}
    for mode, per_run in runs.items():
        later = [t for run in per_run for t in run[1:]]
        first = [run[0] for run in per_run]
        res[mode] = {
            "saves": len(later),
            "blocked_s": statistics.median(t["blocked_s"] for t in later),
            "first_blocked_s": statistics.median(t["blocked_s"] for t in first),
            "waited_s": statistics.median(t["waited_s"] for t in later),
            "background_s": statistics.median(t.get("background_s", 0.0) for t in later),
            "all_blocked_s": [[round(t["blocked_s"], 4) for t in run] for run in per_run],
        }
    res["ratio"] = res["async"]["blocked_s"] / res["sync"]["blocked_s"]
    return res


def by_world(config: str, overrides: list[str], worlds: list[int], saves: int, interval: int) -> list[dict]:
    from kimi.checkpoint import CheckpointStore
    from kimi.checkpoint.store import checksums

    rows = []
    for world in worlds:
        out = Path(tempfile.mkdtemp(prefix="kimi-bench-ckpt-"))
        args = _overrides(overrides, out, saves, interval, world)
        try:
            if world == 1:
                timings = _train(config, args)
            else:
                mp.spawn(_rank_main, args=(world, str(out), config, args), nprocs=world, join=True)
                timings = json.loads((out / TIMINGS).read_text())
            step_dir = CheckpointStore(out / "checkpoints").latest()
            t0 = time.perf_counter()
            checksums(step_dir)  # one process hashing every file, as rank 0 alone did before
            one = time.perf_counter() - t0
            size = sum(p.stat().st_size for p in step_dir.rglob("*") if p.is_file())
        finally:
            shutil.rmtree(out, ignore_errors=True)
        rows.append({
            "world": world,
            "save_s": statistics.median(t["blocked_s"] for t in timings),
            "hash_share_s": statistics.median(t["hash_s"] for t in timings),
            "hash_all_one_process_s": one,
            "checkpoint_MB": size / 1e6,
        })  # fmt: skip
    return rows


def report(r: dict) -> str:
    sa = r["sync_vs_async"]
    a = [[m, str(sa[m]["saves"]), f"{1000 * sa[m]['blocked_s']:.0f}", f"{1000 * sa[m]['first_blocked_s']:.0f}",
          f"{1000 * sa[m]['waited_s']:.0f}", f"{1000 * sa[m]['background_s']:.0f}" if m == "async" else "-"]
         for m in ("sync", "async")]  # fmt: skip
    w = [[str(x["world"]), f"{x['checkpoint_MB']:.0f}", f"{1000 * x['save_s']:.0f}", f"{1000 * x['hash_share_s']:.0f}",
          f"{1000 * x['hash_all_one_process_s']:.0f}"] for x in r["by_world"]]  # fmt: skip
    return "\n".join([
        f"kimi.bench checkpoint: {r['config']} on {r['device']}, torch {r['torch']}", "",
        *md_table(["save", "saves", "loop blocked ms (median)", "first save of a run ms",
                   "of which waiting for the previous save ms", "written in the background ms"], a),
        f"\nasync / sync blocked time: {100 * sa['ratio']:.1f}%", "",
        *md_table(["world", "checkpoint MB", "sync save ms (median)", "hashing this rank's share ms",
                   "one process hashing all files ms"], w)])  # fmt: skip


def main(args, overrides: list[str]) -> dict:
    config = QUICK_CONFIG if args.quick else args.config
    saves, interval, rounds = (3, 2, 1) if args.quick else (args.saves, args.interval, args.rounds)
    worlds = [1, 2] if args.quick else [int(w) for w in (args.worlds or "1,2,4").split(",")]
    if saves < 3 or interval < 1 or rounds < 1 or min(worlds) < 1:
        raise ValueError("--saves must be >= 3 (the first is reported apart, the last not counted); "
                         "--interval, --rounds and --worlds >= 1")  # fmt: skip
    load_config(config, _overrides(overrides, Path("unused"), saves, interval, 1))  # bad overrides: one line, first
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{os.cpu_count()}"
    r = {"config": config, "device": device, "torch": torch.__version__, "overrides": overrides}
    r["sync_vs_async"] = sync_vs_async(config, overrides, saves, interval, rounds)
    r["by_world"] = by_world(config, overrides, worlds, saves, interval)
    print(report(r))
    save_json(args.json, r)
    return r
