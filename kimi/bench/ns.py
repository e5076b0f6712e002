"""python -m kimi.bench ns [--config configs/debug.yaml] [--variants quintic:5,polar_express:4,...]
                         [--rounds 2] [--chunk-numel N] [--json out.json] [--section.key=value ...]

Muon's Newton-Schulz alone, on the config's Muon matrices: the parameters `build_optimizer` puts in the
Muon group, cut into the optimizer step's chunks (`update_chunks`), each chunk orthogonalised by the step's
own `orthogonalize` (same-shape matrices batched, as in training) on random updates of those shapes. A
variant is method:steps[:gram], e.g. polar_express:4:gram. Variants are interleaved inside each of --rounds
rounds (this machine is shared: a drift hits all of them alike); reported: the median over rounds of the
wall and process-CPU ms of one whole pass. `--chunk-numel` changes the chunk size (the batch of each call).
The training step's own optimizer phase is `kimi.bench throughput --optim.ns_method=...`. Numbers for
docs/benchmarking.md, never for tests.
"""

from __future__ import annotations

import statistics
import time

import torch

from kimi.bench.tables import md_table, save_json
from kimi.config import load_config


def add_args(p) -> None:
    p.add_argument("--variants", default="quintic:5,polar_express:4,quintic:5:gram,polar_express:4:gram",
                   help="ns: method:steps[:gram] to time, comma-separated")  # fmt: skip
    p.add_argument("--chunk-numel", type=int, default=None, help="ns: Muon chunk size (default: the optimizer's)")


def muon_chunks(config: str, overrides: list[str], chunk_numel: int | None) -> list[list[torch.Tensor]]:
    """The config's Muon parameters (on the meta device) in the optimizer step's chunks."""
    from kimi.model import KimiModel
    from kimi.optim import build_optimizer
    from kimi.optim.muon import update_chunks

    cfg = load_config(config, overrides)
    with torch.device("meta"):
        opt = build_optimizer(KimiModel(cfg.model), cfg.optim)
    params = [p for g in opt.param_groups if g["use_muon"] for p in g["params"]]
    return update_chunks(params, chunk_numel or opt.chunk_numel)


def parse_variant(v: str):
    from kimi.optim.newton_schulz import NSSpec

    parts = v.split(":")
    if len(parts) not in (2, 3) or not parts[1].isdigit() or parts[2:] not in ([], ["gram"]):
        raise ValueError(f"--variants: {v!r} is not method:steps[:gram], e.g. polar_express:4:gram")
    return NSSpec(parts[0], int(parts[1]), parts[2:] == ["gram"])


def run(config: str, overrides: list[str], variants: list[str], rounds: int, chunk_numel: int | None) -> dict:
    from kimi.optim.dist_muon import orthogonalize

    specs = {v: parse_variant(v) for v in variants}
    chunks = muon_chunks(config, overrides, chunk_numel)
    gen = torch.Generator().manual_seed(0)
    updates = [[torch.randn(p.shape, generator=gen) for p in c] for c in chunks]
    wall: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(rounds):
        for v, ns in specs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            for c, u in zip(chunks, updates):
                orthogonalize(c, u, ns)
            wall[v].append(1000 * (time.perf_counter() - t0))
            cpu[v].append(1000 * (time.process_time() - c0))
    calls = sum(len({tuple(p.shape) for p in c}) for c in chunks)
    return {"config": config, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "matrices": sum(p.numel() // (p.shape[-2] * p.shape[-1]) for c in chunks for p in c),
            "chunks": len(chunks), "ns_calls": calls,
            "variants": {v: {"wall_ms": wall[v], "cpu_ms": cpu[v], "wall_median_ms": statistics.median(wall[v]),
                             "cpu_median_ms": statistics.median(cpu[v])} for v in variants}}  # fmt: skip


def report(r: dict) -> str:
    base = next(iter(r["variants"].values()))["cpu_median_ms"]
    rows = [[v, f"{m['wall_median_ms']:.0f}", f"{m['cpu_median_ms']:.0f}", f"{m['cpu_median_ms'] / base:.2f}",
             " ".join(f"{x:.0f}" for x in m["cpu_ms"])] for v, m in r["variants"].items()]  # fmt: skip
    return "\n".join([
        f"kimi.bench ns: {r['config']}, {r['matrices']} Muon matrices in {r['chunks']} chunks ({r['ns_calls']} "
        f"Newton-Schulz calls per pass), {r['threads']} threads, torch {r['torch']}", "",
        *md_table(["variant", "wall ms (median)", "CPU ms (median)", "CPU vs first", "CPU ms per round"], rows)])  # fmt: skip


def main(args, overrides: list[str]) -> dict:
    r = run(args.config, overrides, args.variants.split(","), args.rounds, args.chunk_numel)
    print(report(r))
    save_json(args.json, r)
    return r
