"""python -m kimi.bench throughput [--config configs/nano.yaml] [--steps 10] [--rounds 2] [--json out.json] [--quick]

Training speed of the config's model and of its nanoGPT-equivalent (kimi/bench/variants.py) in the same
process, on synthetic tokens (speed does not depend on the text):
  tokens/s and MFU   MFU = model FLOPs/token (KimiModel.flops_per_token) x tokens/s / peak, where the peak
                     is a dense matmul measured in this run on this machine (fp32 on CPU, bf16 on GPU;
                     on GPU the datasheet figure is printed beside it, and MFU is given for both)
  step breakdown     the trainer's own train_step (kimi/train.py, engine in the path) with train.profile on:
                     forward (routing included), backward, optimizer (clip, the router-bias pre-step hook,
                     Muon's Newton-Schulz + AdamW), and routing: the router + top-k inside the forward.
                     Each phase ends in a device sync, so the total is a little above an unprofiled step's.
  MoE vs dense       one MoE layer's forward+backward against a dense SwiGLU MLP with the same active
                     FLOPs (hidden = (n_shared + top_k) * expert_hidden), at the nano and small widths.
  Newton-Schulz      the matmul FLOPs Muon's orthogonalisation adds to each step (Muon.newton_schulz_flops)
                     as a share of the model's: MFU leaves them out, so against an AdamW baseline they cap
                     the MFU ratio at 1 / (1 + share) even where every matmul runs as fast as the baseline's.
Medians over the steps after the first --warmup (default 3): a process's first steps grow malloc's heap,
and touching new pages costs page faults that later steps do not pay (on the 2-core Xeon, nano at 32 x 256:
25k-200k faults in nanoKimi's second or third step, ~0.3 s quiet and up to ~2.7 s with another job on the
other core; few or none from its fourth). Each run's per-step times are in the JSON (`step_s_each`).
With --rounds N (default 2) the two models take turns, N runs each (nanoKimi, nanoGPT, nanoGPT, nanoKimi,
...), so drift in the machine's speed (other jobs, clocks) hits both alike: each figure is the median over
rounds, and the MFU ratio is given per round too (its spread says how far to trust it; single runs on a
shared 2-core VM varied by ~30%).
With --ablations A,B (compare's names, e.g. dense_muon,kimi_mha): nanoKimi and those variants at the
baseline's active size instead of the pair, and each one's speed relative to --reference (default
dense_muon if timed, else kimi): kimi/bench/throughput_variants.py.
Numbers for docs/benchmarking.md, never for tests.
"""

from __future__ import annotations

import copy
import json
import shutil
import statistics
import tempfile
from pathlib import Path

import torch

from kimi.bench.tables import md_table, save_json
from kimi.config import Config, load_config
from kimi.runtime import datasheet_peak_flops, matmul_peak, sync_time

QUICK_CONFIG = "configs/debug.yaml"


class _RouteTimer:
    """Times every MoE layer's `_route` (router scores + top-k, inside the forward) by wrapping the bound method."""

    def __init__(self, model, device):
        self.total, self.device = 0.0, device
        for moe in model.moe_layers():
            moe._route = self._wrap(moe._route)

    def _wrap(self, fn):
        def timed(*a, **k):
            t0 = sync_time(self.device)
            out = fn(*a, **k)
            self.total += sync_time(self.device) - t0
            return out

        return timed


def add_args(p) -> None:
    p.add_argument("--warmup", type=int, default=3, help="throughput: steps at the start of each run left out of "
                   "the medians (the allocator's warm-up; see this module's docstring)")  # fmt: skip
    p.add_argument("--ops", type=int, default=0, help="throughput --ablations: after the timed rounds, one "
                   "profiled run per variant (the trainer's train.profile_steps) and a table of the N ops with the "
                   "most self time per step")  # fmt: skip


def step_breakdown(cfg: Config, steps: int, device: torch.device, ops: bool = False, warmup: int = 1) -> dict:
    """Run `python -m kimi.train`'s own trainer for `steps` steps of cfg's model on synthetic tokens, with
    `train.profile` on (device syncs between phases), and return the median per-phase times, tokens/s and
    peak memory, over the steps after the first `warmup`. The step is the trainer's `train_step`, the engine
    in the path; a hook reads each row. `ops`: also profile the steps after the warm-up with the trainer's
    own `train.profile_steps` and return each op's self time per step from its ops file (`ops_s`, device
    time on GPU; the profiler slows the step, so time the rounds without it)."""
    from kimi.train import Hooks, train

    cfg = copy.deepcopy(cfg)
    t = cfg.train
    out = tempfile.mkdtemp(prefix="kimi-throughput-")
    t.max_steps, t.profile, t.out_dir, t.resume = steps, True, out, False
    t.eval_interval, t.ckpt_interval, t.log_interval, t.device = 0, 0, steps, device.type
    cfg.data.dataset, cfg.data.mix, cfg.logging.mlflow = "toy", [], False  # throughput is timed on toy data
    timer: list[_RouteTimer] = []
    rows = []

    def on_build(trainer) -> None:
        timer.append(_RouteTimer(trainer.raw_model, device))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    if ops:
        t.profile_steps = f"{warmup + 1}:{steps}"  # writes OUT/profile/rank0_ops_steps_{warmup + 1}-{steps}.json

    def on_step(step: int, row: dict) -> None:
        rows.append({"step_s": row["step_time_s"], "forward_s": row["forward_ms"] / 1000,
                     "backward_s": row["backward_ms"] / 1000, "optimizer_s": row.get("optim_ms", 0.0) / 1000,
                     "routing_s": timer[0].total})  # fmt: skip
        timer[0].total = 0.0

    try:
        train(cfg, hooks=Hooks(on_build=on_build, on_step=on_step))
        if ops:
            opsfile = Path(out) / "profile" / f"rank0_ops_steps_{warmup + 1}-{steps}.json"
            ops_s = json.loads(opsfile.read_text())["ops_s_per_step"]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    each = [r["step_s"] for r in rows]
    rows = rows[warmup:] or rows
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    tokens = t.global_batch_size * cfg.block_size
    model = _meta_model(cfg)
    res = {**med, "tokens_per_s": tokens / med["step_s"], "flops_per_token": model.flops_per_token(cfg.block_size),
           "params_total": model.num_params(), "params_active_non_embedding": model.num_active_params(True),
           "ns_flops_per_step": ns_flops_per_step(cfg, model, device), "tokens_per_step": tokens,
           "step_s_each": each}  # fmt: skip
    if device.type == "cuda":
        res["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    if ops:
        res["ops_s"] = ops_s
    return res


def ns_flops_per_step(cfg: Config, model, device: torch.device) -> int:
    """Matmul FLOPs of Muon's Newton-Schulz in one step of cfg's optimizer on `model`, run on `device` (0 with
    AdamW)."""
    from kimi.optim import build_optimizer

    return build_optimizer(model, cfg.optim).newton_schulz_flops(device) if cfg.optim.name == "muon" else 0


def _meta_model(cfg: Config):
    """The model of `cfg` on the meta device (for counting)."""
    from kimi.model import KimiModel

    with torch.device("meta"):
        return KimiModel(cfg.model)


def moe_vs_dense(config: str, tokens: int, reps: int, device: torch.device) -> dict:
    """Median fwd+bwd ms of one MoE layer vs a dense SwiGLU of equal active FLOPs, at config's width."""
    from kimi.model.layers import MLP
    from kimi.model.moe import MoE

    cfg = load_config(config).model
    moe_cfg = cfg.moe
    moe = MoE(cfg.n_embd, moe_cfg).to(device)
    dense = MLP(cfg.n_embd, (moe_cfg.n_shared_experts + moe_cfg.top_k) * moe_cfg.expert_hidden).to(device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    x = torch.randn(1, tokens, cfg.n_embd, device=device, requires_grad=True)
    res = {}
    for name, layer in (("moe", moe), ("dense", dense)):
        times = []
        for _ in range(reps + 1):
            t0 = sync_time(device)
            with amp:
                y = layer(x)
            y.float().square().mean().backward()
            times.append(sync_time(device) - t0)
        res[f"{name}_ms"] = 1000 * statistics.median(times[1:])
    res.update(width=cfg.n_embd, tokens=tokens, experts=moe_cfg.num_experts, top_k=moe_cfg.top_k,
               ratio=res["moe_ms"] / res["dense_ms"])  # fmt: skip
    return res


def interleaved(pair: dict[str, Config], steps: int, rounds: int, device: torch.device, warmup: int = 1) -> dict:
    """step_breakdown of each config, in turns, `rounds` times; per config the median of each figure over
    rounds (the peak memory: the largest), plus the per-round tokens/s (`rounds_tokens_per_s`)."""
    per: dict[str, list[dict]] = {name: [] for name in pair}
    for i in range(rounds):
        for name in list(pair)[:: 1 if i % 2 == 0 else -1]:  # the order flips every round
            per[name].append(step_breakdown(pair[name], steps, device, warmup=warmup))
    out = {}
    for name, runs in per.items():
        out[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "step_s_each"}  # counts: equal
        out[name]["step_s_each"] = [r["step_s_each"] for r in runs]
        if "peak_memory_bytes" in runs[0]:
            out[name]["peak_memory_bytes"] = max(r["peak_memory_bytes"] for r in runs)
        out[name]["rounds_tokens_per_s"] = [r["tokens_per_s"] for r in runs]
    return out


def run(config: str, overrides: list[str], steps: int, quick: bool, rounds: int = 2, warmup: int = 1) -> dict:
    from kimi.bench.variants import matched_pair

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kimi_cfg, base_cfg = matched_pair(config, overrides)
    peak = matmul_peak(device, dtype, n=256 if quick else None)
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads",
           "torch": torch.__version__, "config": config, "matmul_peak_flops": peak, "matmul_dtype": str(dtype),
           "rounds": rounds, "steps": steps, "warmup": warmup}  # fmt: skip
    if device.type == "cuda":
        out["datasheet_peak_flops"] = datasheet_peak_flops(device)
    for name, r in interleaved({"nanokimi": kimi_cfg, "nanogpt": base_cfg}, steps, rounds, device, warmup).items():
        r["mfu_measured_peak"] = r["flops_per_token"] * r["tokens_per_s"] / peak
        if out.get("datasheet_peak_flops"):
            r["mfu_datasheet"] = r["flops_per_token"] * r["tokens_per_s"] / out["datasheet_peak_flops"]
        out[name] = r
    k, g = out["nanokimi"], out["nanogpt"]
    # MFU ratio = (FLOPs/token x tokens/s) over the pair; then the same with Newton-Schulz's matmuls counted
    # too (hardware FLOPs): how fast each step runs the matmul work it really does, which MFU does not say
    for key, per_token in (("mfu_ratio", lambda m: m["flops_per_token"]), ("hw_flops_ratio", hardware_flops_per_token)):
        out[f"{key}_rounds"] = pair_ratio_rounds(k, g, per_token)
        out[key] = statistics.median(out[f"{key}_rounds"])
    widths = [QUICK_CONFIG] if quick else ["configs/nano.yaml", "configs/small.yaml"]
    tokens = 256 if quick else (16384 if device.type == "cuda" else 2048)
    out["moe_vs_dense"] = [moe_vs_dense(c, tokens, 2 if quick else 5, device) for c in widths]
    return out


def report(r: dict) -> str:
    peak = f"measured {r['matmul_dtype']} matmul peak {r['matmul_peak_flops'] / 1e12:.3f} TFLOP/s"
    if r.get("datasheet_peak_flops"):
        peak += f", datasheet {r['datasheet_peak_flops'] / 1e12:.0f} TFLOP/s"
    speed = []
    for name in ("nanokimi", "nanogpt"):
        m = r[name]
        mfu = f"{100 * m['mfu_measured_peak']:.1f}%"
        if "mfu_datasheet" in m:
            mfu += f" ({100 * m['mfu_datasheet']:.1f}% of datasheet)"
        phases = [f"{1000 * m[k]:.1f}" for k in ("step_s", "forward_s", "backward_s", "optimizer_s", "routing_s")]
        speed.append([name, f"{m['tokens_per_s']:,.0f}", mfu, *phases])
    moe = [[str(m["width"]), str(m["tokens"]), f"{m['experts']} ({m['top_k']})", f"{m['moe_ms']:.2f}",
            f"{m['dense_ms']:.2f}", f"{m['ratio']:.2f}"] for m in r["moe_vs_dense"]]  # fmt: skip
    ratios = ", ".join(f"{x:.2f}" for x in r["mfu_ratio_rounds"])
    return "\n".join([
        f"kimi.bench throughput: {r['config']} on {r['device']}, torch {r['torch']}; {peak}; "
        f"medians of {r['rounds']} interleaved round(s) of {r['steps']} steps, the first {r['warmup']} not counted", "",
        *md_table(["model", "tokens/s", "MFU (measured peak)", "step ms", "forward", "backward", "optimizer",
                   "routing"], speed), "",
        f"MFU nanoKimi / nanoGPT: {r['mfu_ratio']:.2f}x (per round: {ratios})", *ns_lines(r), "",
        *md_table(["width", "tokens", "experts (top-k)", "MoE fwd+bwd ms", "dense SwiGLU (same active FLOPs) ms",
                   "MoE/dense"], moe)])  # fmt: skip


def pair_ratio_rounds(k: dict, g: dict, flops_per_token) -> list[float]:
    """Per round (the two runs next to each other), nanoKimi's FLOPs/s over nanoGPT's, FLOPs counted by
    `flops_per_token(run)`."""
    return [flops_per_token(k) * a / (flops_per_token(g) * b)
            for a, b in zip(k["rounds_tokens_per_s"], g["rounds_tokens_per_s"])]  # fmt: skip


def hardware_flops_per_token(m: dict) -> float:
    """The matmul FLOPs a step runs per token: the model's (what MFU counts) plus Muon's Newton-Schulz."""
    return m["flops_per_token"] + m.get("ns_flops_per_step", 0) / m["tokens_per_step"]


def ns_lines(r: dict) -> list[str]:
    """What Muon's Newton-Schulz adds to nanoKimi's step that MFU does not count, the MFU ratio that leaves at
    equal matmul efficiency, and the ratio with those FLOPs counted (how well the step runs its matmuls)."""
    m = r["nanokimi"]
    if not m.get("ns_flops_per_step"):
        return []
    share = m["ns_flops_per_step"] / (m["flops_per_token"] * m["tokens_per_step"])
    rounds = ", ".join(f"{x:.2f}" for x in r["hw_flops_ratio_rounds"])
    return [
        f"Muon's Newton-Schulz: {m['ns_flops_per_step'] / 1e9:.1f} GFLOP a step, {share:.2f}x nanoKimi's model "
        f"FLOPs, which MFU does not count: at equal matmul efficiency the MFU ratio is at most {1 / (1 + share):.2f}x",
        f"Counting them (hardware FLOPs/s), nanoKimi / nanoGPT: {r['hw_flops_ratio']:.2f}x (per round: {rounds})",
    ]


def checked_args(args) -> tuple[str, int, int, int]:
    """(config, steps, rounds, warmup) of the command line, or a ValueError that says what to give."""
    steps, warmup = (2, 1) if args.quick else (args.steps, args.warmup)
    if warmup < 0:
        raise ValueError(f"--warmup={warmup}: need >= 0")
    if steps <= warmup:
        raise ValueError(f"--steps={steps}: need more than --warmup={warmup} (the warm-up steps are not counted)")
    if args.rounds < 1:
        raise ValueError(f"--rounds={args.rounds}: need >= 1")
    return QUICK_CONFIG if args.quick else args.config, steps, args.rounds, warmup


def main(args, overrides: list[str]) -> dict:
    config, steps, rounds, warmup = checked_args(args)
    if args.ops:
        raise ValueError("--ops tables the ops of compare's variants: give it with --ablations, e.g. dense_muon,kimi")
    r = run(config, overrides, steps, args.quick, rounds, warmup)
    print(report(r))
    save_json(args.json, r)
    return r
