"""Benchmarks (numbers for notes and docs/benchmarking.md; never asserted in tests).

    python -m kimi.bench dist  [--config configs/debug.yaml] [--nproc 2] [--steps 10] [--section.key=value ...]
    python -m kimi.bench train [--config configs/debug.yaml] [--steps 10] [--section.key=value ...]
    python -m kimi.bench kernels   (Triton routing kernels vs torch on one GPU: see kimi/bench/kernels.py)
    python -m kimi.bench compare    [--quick] ...  nanoKimi vs a nanoGPT-equivalent (kimi/bench/compare.py)
    python -m kimi.bench throughput [--quick] ...  tokens/s, MFU, step breakdown (kimi/bench/throughput.py)
    python -m kimi.bench memory     [--quick] ...  KV cache, generation and training memory (kimi/bench/memory.py)
    python -m kimi.bench data       [--quick] ...  prepare tokens/s and RSS vs corpus size, loader (kimi/bench/data.py)
    python -m kimi.bench state      [--worlds 1,2,4,8] ...  bytes each rank holds vs --dry-run (kimi/bench/state.py)
    python -m kimi.bench checkpoint [--quick] ...  loop time held by sync vs async saves, save time vs world size
                                                   (kimi/bench/checkpoint.py)
    python -m kimi.bench convert    [--quick] ...  HF import: peak RSS vs shard sizes (kimi/bench/convert.py)
    python -m kimi.bench ns         [--variants ...]  Muon's Newton-Schulz alone on the config's matrices (kimi/bench/ns.py)

`dist` runs the real training loop on `nproc` gloo/NCCL processes for each of: EP=1 and EP=ep
(the same global batch, so the same work), with Muon and with AdamW, and prints per step: tokens/s,
step time, optimizer time and the expert-parallel all-to-all bytes and time (profiling on: the
collectives are waited for, so the times are honest but the step is slightly slower than in training).
`train` runs one process and prints the same numbers. Medians over the steps after the first two.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

from kimi.bench.ranks import bench_rank
from kimi.config import load_config


def _rank_main(rank: int, world: int, store_dir: str, config: str | None, overrides: list[str]) -> None:
    from kimi.train import train

    with bench_rank(rank, world, store_dir, threads=max(1, (os.cpu_count() or 2) // world), timeout_s=300):
        train(load_config(config, overrides))


def run_variant(config: str | None, overrides: list[str], nproc: int) -> list[dict]:
    out = Path(tempfile.mkdtemp(prefix="kimi-bench-"))
    args = [
        *overrides,
        f"--train.out_dir={out}",
        "--logging.mlflow=false",
        "--train.profile=true",
        "--train.log_interval=1",
        "--train.eval_interval=0",
        "--train.resume=false",
        "--train.ckpt_interval=1000000",
    ]
    if nproc == 1:
        from kimi.train import train

        train(load_config(config, args))
    else:
        mp.spawn(_rank_main, args=(nproc, str(out), config, args), nprocs=nproc, join=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out, ignore_errors=True)  # the final checkpoint is not wanted
    return rows


def summarise(rows: list[dict]) -> dict:
    rows = rows[2:] or rows  # the first steps pay for allocation and warm-up

    def med(k):
        vals = [r[k] for r in rows if k in r]
        return statistics.median(vals) if vals else float("nan")

    return {k: med(k) for k in ("tokens_per_s", "step_time_s", "optim_ms", "a2a_MB", "a2a_ms", "loss")}


def _table(results: list[tuple[str, dict]]) -> str:
    head = f"{'variant':<28}{'tokens/s':>10}{'step ms':>10}{'optim ms':>10}{'a2a MB':>9}{'a2a ms':>9}"
    lines = [head, "-" * len(head)]
    for name, s in results:
        lines.append(
            f"{name:<28}{s['tokens_per_s']:>10,.0f}{1000 * s['step_time_s']:>10.1f}{s['optim_ms']:>10.1f}"
            f"{s['a2a_MB']:>9.2f}{s['a2a_ms']:>9.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m kimi.bench", description=__doc__.split("\n\n")[0])
    from kimi.bench import checkpoint, compare, convert, data, memory, ns, state, throughput, throughput_variants

    what = ["dist", "train", "kernels", "compare", "throughput", "memory", "data", "state", "checkpoint", "convert",
            "ns"]  # fmt: skip
    p.add_argument("what", choices=what)
    p.add_argument("--config", default="configs/debug.yaml")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--ep", type=int, default=None, help="EP degree to compare with EP=1 (default: nproc)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="compare/throughput/memory: a tiny run (the tests' smoke mode)")
    compare.add_args(p)
    memory.add_args(p)
    data.add_args(p)
    p.add_argument("--worlds", help="state: world sizes to run (default 1,2,4,8); checkpoint: for the save-time "
                   "table (default 1,2,4)")  # fmt: skip
    state.add_args(p)
    checkpoint.add_args(p)
    throughput.add_args(p)
    convert.add_args(p)
    ns.add_args(p)
    args, overrides = p.parse_known_args(argv)
    if args.what == "kernels":
        from kimi.bench.kernels import run

        return run()
    try:  # bad input (a ConfigError is a ValueError) is one line and exit code 2, never a traceback
        benches = {"compare": compare, "throughput": throughput, "memory": memory, "data": data, "state": state,
                   "checkpoint": checkpoint, "convert": convert, "ns": ns}  # fmt: skip
        if args.what == "throughput" and args.ablations:  # compare's variants instead of the nanoGPT pair
            benches["throughput"] = throughput_variants
        if args.what in benches:
            return benches[args.what].main(args, overrides)
        return run_train_or_dist(args, overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run_train_or_dist(args: argparse.Namespace, overrides: list[str]) -> None:
    overrides = [*overrides, f"--train.max_steps={args.steps}"]
    load_config(args.config, overrides)  # here, once: in `dist` each spawned rank would print its traceback
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{os.cpu_count()}"
    results = []
    if args.what == "train":
        results.append(("1 process", summarise(run_variant(args.config, overrides, 1))))
    else:
        ep = args.ep or args.nproc
        for optim in ("muon", "adamw"):
            for e in (1, ep):
                name = f"{args.nproc} ranks, ep={e}, {optim}"
                rows = run_variant(args.config, [*overrides, f"--parallel.ep={e}", f"--optim.name={optim}"], args.nproc)
                results.append((name, summarise(rows)))
    print(f"\nkimi.bench {args.what}: {args.config} {' '.join(overrides)} on {device}, torch {torch.__version__}")
    print(_table(results))
