"""python -m kimi.bench state [--config configs/debug.yaml] [--worlds 1,2,4,8] [--engines fsdp2,zero1,zero2] [overrides]

What each rank of a real run holds against --dry-run's estimate of it. Measured: the bytes of every live
tensor just before the second optimizer step is applied (hooks on the trainer's own engine): parameters,
gradients, the optimizer state of the first step and whatever else the engine keeps from step to step
(DeepSpeed's fp32 master partitions); activations are freed by then, and the batch is a few KB. Predicted:
the estimate's params + grads + optim for the same config, layout and device (kimi/engine/<name>.py
`memory_estimate`). Also each rank's peak RSS. Layout: parallel.ep = the world size (at most the expert
count), micro-batch = global batch / world, so every world size trains the same model on the same batch.
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kimi.bench.ranks import bench_rank
from kimi.bench.tables import md_table, save_json, vm_hwm
from kimi.config import load_config

STATES = ("params", "grads", "optim")
ENGINES = {"fsdp2": ["--parallel.engine=fsdp2"],
           "zero1": ["--parallel.engine=deepspeed", "--parallel.deepspeed.zero_stage=1"],
           "zero2": ["--parallel.engine=deepspeed", "--parallel.deepspeed.zero_stage=2"]}  # fmt: skip


def held_bytes() -> int:
    """Bytes of the storages behind every live tensor of this process (each storage once; a DTensor counts
    through its local shard; a freed FSDP2 unsharded parameter, resized to 0, counts 0)."""
    from torch.distributed.tensor import DTensor

    gc.collect()  # what only a reference cycle still holds is not held
    seen: dict[int, int] = {}
    with warnings.catch_warnings():  # isinstance() on some module objects of torch warns of deprecations
        warnings.simplefilter("ignore")
        objects = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    for obj in objects:
        if isinstance(obj, DTensor) or obj.device.type == "meta":
            continue
        try:
            storage = obj.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage of their own
            continue
        if storage.data_ptr():
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(seen.values())


def measuring_hooks(result: dict, at_step: int = 2):
    """Hooks for kimi.train.train that put held_bytes() just before optimizer step `at_step` into
    result["held"], and the trainer's device into result["device"]."""
    from kimi.train import Hooks

    def on_build(trainer) -> None:
        engine, step, calls = trainer.engine, trainer.engine.step, [0]
        result["device"] = trainer.rt.device.type

        def measured_step() -> None:
            calls[0] += 1
            if calls[0] == at_step:
                result["held"] = held_bytes()
            step()

        engine.step = measured_step

    return Hooks(on_build=on_build)


def layout_args(engine: str, world: int, num_experts: int, global_batch: int) -> list[str]:
    """`engine` is one of ENGINES (zero1, zero2: DeepSpeed at that ZeRO stage)."""
    return [*ENGINES[engine], f"--parallel.ep={min(world, num_experts)}",
            f"--train.micro_batch_size={global_batch // world}"]  # fmt: skip


def measure(config: str, overrides: list[str]) -> dict:
    """Train 2 steps of `config` + `overrides` in this process (a rank of a job, or the whole job) and return
    {"held", "predicted" (params + grads + optim of the configured engine), "rss"}."""
    from kimi.dry_run import memory_plan
    from kimi.train import train

    cfg = load_config(config, [*overrides, "--train.max_steps=2", "--logging.mlflow=false",
                               "--train.eval_interval=0"])  # fmt: skip
    result: dict = {}
    train(cfg, hooks=measuring_hooks(result))
    world = dist.get_world_size() if dist.is_initialized() else 1
    # The estimate for the device the run used: train.device=auto plans for a GPU.
    plan = memory_plan(load_config(config, [*overrides, f"--train.device={result['device']}"]), world)
    estimate = plan["engines"][cfg.parallel.engine]
    return {"held": result["held"], "predicted": sum(estimate[k] for k in STATES), "rss": vm_hwm() or 0}


def _rank(rank: int, world: int, store: str, config: str, overrides: list[str]) -> None:
    with bench_rank(rank, world, store):
        Path(f"{store}/rank{rank}.json").write_text(json.dumps(measure(config, overrides)))


def run(config: str, overrides: list[str], worlds: list[int], engines: list[str]) -> list[dict]:
    base = load_config(config, overrides)
    rows = []
    for engine in engines:
        for world in worlds:
            args = [*overrides, *layout_args(engine, world, base.model.moe.num_experts, base.train.global_batch_size)]
            with tempfile.TemporaryDirectory(prefix="kimi-state-") as tmp:
                t0 = time.perf_counter()
                mp.spawn(_rank, args=(world, tmp, config, [*args, f"--train.out_dir={tmp}/out"]), nprocs=world)
                ranks = [json.loads(Path(f"{tmp}/rank{r}.json").read_text()) for r in range(world)]
            held = [r["held"] for r in ranks]
            rows.append({"engine": engine, "world": world, "held_min": min(held), "held_max": max(held),
                         "predicted": ranks[0]["predicted"], "ratio": ranks[0]["predicted"] / max(held),
                         "rss_max": max(r["rss"] for r in ranks), "seconds": time.perf_counter() - t0})  # fmt: skip
    return rows


def report(rows: list[dict], title: str) -> str:
    mb = 2**20
    table = [[r["engine"], str(r["world"]), f"{r['predicted'] / mb:.2f}",
              f"{r['held_min'] / mb:.2f}" + ("" if r["held_min"] == r["held_max"] else f" - {r['held_max'] / mb:.2f}"),
              f"{r['ratio']:.3f}", f"{r['rss_max'] / mb:.0f}"] for r in rows]  # fmt: skip
    head = ["engine", "world", "predicted MiB", "measured MiB (ranks)", "predicted / measured", "peak RSS MiB"]
    return "\n".join([title, "", *md_table(head, table)])


def main(args, overrides: list[str]) -> list[dict]:
    worlds = [int(w) for w in (args.worlds or "1,2,4,8").split(",")]
    engines = args.engines.split(",")
    if unknown := [e for e in engines if e not in ENGINES]:
        raise ValueError(f"--engines: {', '.join(unknown)} not among {', '.join(ENGINES)}")
    rows = run(args.config, overrides, worlds, engines)
    print(report(rows, f"kimi.bench state: {args.config} {' '.join(overrides)}, torch {torch.__version__}"))
    save_json(args.json, {"config": args.config, "overrides": overrides, "rows": rows})
    return rows


def add_args(p) -> None:
    p.add_argument("--engines", default="fsdp2,zero1,zero2", help="state: engines to run (zeroN: DeepSpeed ZeRO-N)")
