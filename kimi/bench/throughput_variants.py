"""python -m kimi.bench throughput --config configs/bench/byte_s.yaml --ablations dense_muon,kimi_mha [--reference dense_muon]

Training speed of `kimi.bench compare`'s variants, built as compare builds them (kimi/bench/variants.py:
nanoKimi's recipe and each named ablation at the nanoGPT-equivalent's active non-embedding size), timed
through the trainer's own step (throughput.step_breakdown) in interleaved rounds: in every round each
variant runs once, the order reversed every other round, so drift in the machine's speed hits all alike.
Per variant: the medians over rounds of tokens/s and of the step's phases, and the speed relative to the
reference variant, per round and its median. At matched active size a speed ratio is the wall-clock
ratio per token of training; with compare's tokens-to-loss it gives the time to a loss.
"""

from __future__ import annotations

import statistics

import torch

from kimi.bench.tables import md_table, save_json
from kimi.bench.throughput import checked_args, interleaved, step_breakdown
from kimi.config import load_config, parse_overrides


def run(config: str, overrides: list[str], ablations: list[str], reference: str, steps: int, rounds: int,
        ops: int = 0, warmup: int = 1) -> dict:  # fmt: skip
    from kimi.bench.variants import ABLATIONS, build_variants

    ablations = list(ABLATIONS) if ablations == ["all"] else ablations
    variants, target = build_variants(config, [1e-3], ablations, parse_overrides(overrides))
    cfgs = {v.name: load_config(config, v.overrides) for v in variants if v.group != "nanogpt"}
    reference = reference or ("dense_muon" if "dense_muon" in cfgs else "kimi")
    if reference not in cfgs:
        raise ValueError(f"--reference {reference}: not among the timed variants ({', '.join(cfgs)})")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    res = interleaved(cfgs, steps, rounds, device, warmup)
    ref = res[reference]["rounds_tokens_per_s"]
    for r in res.values():
        r["speed_rounds"] = [a / b for a, b in zip(r["rounds_tokens_per_s"], ref)]
        r["speed"] = statistics.median(r["speed_rounds"])
    if ops:  # a separate profiled run each: the profiler's overhead stays out of the timed rounds
        for name, cfg in cfgs.items():
            profiled = step_breakdown(cfg, steps, device, ops=True, warmup=warmup)
            res[name]["ops_s"], res[name]["ops_step_s"] = profiled["ops_s"], profiled["step_s"]
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return {"device": where, "torch": torch.__version__, "config": config, "overrides": overrides, "rounds": rounds,
            "steps": steps, "warmup": warmup, "active_non_embedding": target, "reference": reference, "variants": res, "ops": ops}  # fmt: skip


def report(r: dict) -> str:
    rows = []
    for name, m in r["variants"].items():
        per_round = ", ".join(f"{x:.2f}" for x in m["speed_rounds"])
        phases = [f"{1000 * m[k]:.0f}" for k in ("step_s", "forward_s", "backward_s", "optimizer_s", "routing_s")]
        rows.append([name, f"{m['tokens_per_s']:,.0f}", f"{m['speed']:.2f}x ({per_round})", *phases])
    return "\n".join([
        f"kimi.bench throughput: {' '.join([r['config'], *r['overrides']])} on {r['device']}, torch {r['torch']}; "
        f"variants at {r['active_non_embedding'] / 1e6:.2f}M active non-embedding params; medians of "
        f"{r['rounds']} interleaved round(s) of {r['steps']} steps, the first {r['warmup']} not counted", "",
        *md_table(["variant", "tokens/s", f"speed vs {r['reference']} (per round)", "step ms", "forward",
                   "backward", "optimizer", "routing"], rows), *_ops_table(r)])  # fmt: skip


def _ops_table(r: dict) -> list[str]:
    """The r["ops"] ops with the most self time in any variant: ms per step in each (profiled runs)."""
    if not r["ops"]:
        return []
    per = {name: m["ops_s"] for name, m in r["variants"].items()}
    top = sorted({op for p in per.values() for op in p}, key=lambda op: -max(p.get(op, 0.0) for p in per.values()))
    rows = [[op, *(f"{1000 * p.get(op, 0.0):.0f}" for p in per.values())] for op in top[: r["ops"]]]
    rows.append(["all ops", *(f"{1000 * sum(p.values()):.0f}" for p in per.values())])
    what = "CPU" if r["device"].startswith("CPU") else "device"  # GPU: kernel time, not the step's wall time
    return ["", f"{what} self time per step, ms (train.profile_steps, one run each; the profiler's overhead included)",
            "", *md_table(["op", *per], rows)]  # fmt: skip


def main(args, overrides: list[str]) -> dict:
    config, steps, rounds, warmup = checked_args(args)
    names = [a for a in args.ablations.split(",") if a]
    if args.ops < 0:
        raise ValueError(f"--ops={args.ops}: give the number of ops to table (0: none)")
    r = run(config, overrides, names, args.reference, steps, rounds, args.ops, warmup)
    print(report(r))
    save_json(args.json, r)
    return r
