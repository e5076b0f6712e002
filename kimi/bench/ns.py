"""python -m kimi.bench ns [--config configs/debug.yaml] [--variants quintic:5,polar_express:4,...]
                         [--rounds 2] [--chunk-numel N] [--json out.json] [--section.key=value ...]

Muon's Newton-Schulz alone, on the config's Muon matrices: the parameters `build_optimizer` puts in the
Muon group, cut into the optimizer step's chunks (`update_chunks`), each chunk orthogonalised by the step's
own `orthogonalize` (same-shape matrices batched, as in training) on random updates of those shapes. A
variant is method:steps[:gram], e.g. polar_express:4:gram. Variants are interleaved inside each of --rounds
rounds (this machine is shared: a drift hits all of them alike); reported: the median over rounds of the
wall and process-CPU ms of one whole pass, and the matmul FLOP/s that wall time gives (`newton_schulz_flops`
of every matrix over it). On a GPU the updates live there, Newton-Schulz runs in its training dtype (bf16),
each pass ends with a sync and a warm-up pass goes first; CPU ms then only counts the host's launch work.
`--chunk-numel` changes the chunk size (the batch of each call).
The training step's own optimizer phase is `kimi.bench throughput --optim.ns_method=...`. Numbers for
docs/benchmarking.md, never for tests.
"""

from __future__ import annotations

import statistics
import time

import torch

from kimi.bench.tables import md_table, save_json
from kimi.config import load_config
from kimi.runtime import sync_time


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
    from kimi.optim.newton_schulz import newton_schulz_flops

    specs = {v: parse_variant(v) for v in variants}
    chunks = muon_chunks(config, overrides, chunk_numel)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(0)
    updates = [[torch.randn(p.shape, generator=gen).to(device) for p in c] for c in chunks]
    shapes = [tuple(p.shape) for c in chunks for p in c]
    flops = {v: sum(newton_schulz_flops(s, ns.steps, ns.gram) for s in shapes) for v, ns in specs.items()}

    def one_pass(ns) -> None:
        for c, u in zip(chunks, updates):
            orthogonalize(c, u, ns)

    if device.type == "cuda":  # kernels' first launch (cuBLAS handles, autotuning) is not the steady state
        for ns in specs.values():
            one_pass(ns)
    wall: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(rounds):
        for v, ns in specs.items():
            t0, c0 = sync_time(device), time.process_time()
            one_pass(ns)
            wall[v].append(1000 * (sync_time(device) - t0))
            cpu[v].append(1000 * (time.process_time() - c0))
    calls = sum(len({tuple(p.shape) for p in c}) for c in chunks)
    variants_out = {}
    for v in variants:
        wall_ms = statistics.median(wall[v])
        variants_out[v] = {"wall_ms": wall[v], "cpu_ms": cpu[v], "wall_median_ms": wall_ms,
                           "cpu_median_ms": statistics.median(cpu[v]), "gflop": flops[v] / 1e9,
                           "tflops_per_s": flops[v] / (wall_ms / 1000) / 1e12}  # fmt: skip
    return {"config": config, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "matrices": sum(p.numel() // (p.shape[-2] * p.shape[-1]) for c in chunks for p in c),
            "chunks": len(chunks), "ns_calls": calls, "variants": variants_out}  # fmt: skip


def report(r: dict) -> str:
    key = "cpu_median_ms" if r["device"] == "cpu" else "wall_median_ms"  # CPU time: steadier on a shared host
    base = next(iter(r["variants"].values()))[key]
    rows = [[v, f"{m['wall_median_ms']:.1f}", f"{m['cpu_median_ms']:.0f}", f"{m[key] / base:.2f}",
             f"{m['gflop']:.1f}", f"{1000 * m['tflops_per_s']:.1f}",
             " ".join(f"{x:.1f}" for x in m["wall_ms"])] for v, m in r["variants"].items()]  # fmt: skip
    return "\n".join([
        f"kimi.bench ns: {r['config']}, {r['matrices']} Muon matrices in {r['chunks']} chunks ({r['ns_calls']} "
        f"Newton-Schulz calls per pass), {r['device']}, {r['threads']} threads, torch {r['torch']}", "",
        *md_table(["variant", "wall ms (median)", "CPU ms (median)", f"{key.split('_')[0]} vs first",
                   "GFLOP a pass", "GFLOP/s (wall)", "wall ms per round"], rows)])  # fmt: skip


def main(args, overrides: list[str]) -> dict:
    r = run(args.config, overrides, args.variants.split(","), args.rounds, args.chunk_numel)
    print(report(r))
    save_json(args.json, r)
    return r
