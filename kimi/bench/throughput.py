"""python -m kimi.bench throughput [--config configs/nano.yaml] [--steps 10] [--json out.json] [--quick]

Training speed of the config's model and of its nanoGPT-equivalent (kimi/bench/variants.py) in the same
process, on synthetic tokens (speed does not depend on the text):
  tokens/s and MFU   MFU = model FLOPs/token (KimiModel.flops_per_token) x tokens/s / peak, where the peak
                     is a dense matmul measured in this run on this machine (fp32 on CPU, bf16 on GPU;
                     on GPU the datasheet figure is printed beside it, and MFU is given for both)
  step breakdown     forward (routing included), backward, optimizer (Muon's Newton-Schulz + AdamW), and
                     routing: the router + top-k inside the forward plus the bias update / QK-clip after
                     the step. Each phase ends in a device sync, so the total is a little above training's.
  MoE vs dense       one MoE layer's forward+backward against a dense SwiGLU MLP with the same active
                     FLOPs (hidden = (n_shared + top_k) * expert_hidden), at the nano and small widths.
Medians over the steps after the first (warm-up). Numbers for docs/benchmarking.md, never for tests.
"""

from __future__ import annotations

import statistics
import time

import torch

from kimi.bench.tables import md_table, save_json
from kimi.config import Config, load_config

QUICK_CONFIG = "configs/debug.yaml"


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int | None = None, reps: int = 5) -> float:
    """Best FLOP/s of an n x n x n matmul (2 n^3 FLOPs) over `reps` timed runs after one warm-up."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = _sync(device)
        a @ b
        best = min(best, _sync(device) - t0)
    return 2 * n**3 / best


class _RouteTimer:
    """Times every MoE layer's `_route` (router scores + top-k) by wrapping the bound method."""

    def __init__(self, model, device):
        self.total, self.device = 0.0, device
        for moe in model.moe_layers():
            moe._route = self._wrap(moe._route)

    def _wrap(self, fn):
        def timed(*a, **k):
            t0 = _sync(self.device)
            out = fn(*a, **k)
            self.total += _sync(self.device) - t0
            return out

        return timed


def step_breakdown(cfg: Config, steps: int, device: torch.device) -> dict:
    """Train cfg's model for `steps` steps on synthetic tokens; median per-phase times, tokens/s, peak memory."""
    from kimi.data.dataset import BatchIterator, ToyDataset
    from kimi.model import KimiModel
    from kimi.optim import QKClip, build_optimizer, clip_grad_norm_
    from kimi.parallel.routing import update_router_bias

    torch.manual_seed(cfg.train.seed)
    model = KimiModel(cfg.model).to(device)
    opt = build_optimizer(model, cfg.optim)
    qk = QKClip(model.attention_layers(), cfg.optim.qk_clip_tau) if cfg.optim.qk_clip else None
    data = ToyDataset(cfg.model.vocab_size, cfg.block_size, cfg.train.seed, num_tokens=max(1 << 16, 4 * cfg.block_size))
    it = BatchIterator(data, cfg.train.global_batch_size, cfg.train.micro_batch_size)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    router = _RouteTimer(model, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows = []
    for _ in range(steps):
        router.total = 0.0
        fwd = bwd = 0.0
        t0 = _sync(device)
        for x, y in it.next_step():
            x, y = x.to(device), y.to(device)
            ta = _sync(device)
            with amp:
                loss = model(x, y).loss / it.grad_accum
            tb = _sync(device)
            loss.backward()
            tc = _sync(device)
            fwd, bwd = fwd + tb - ta, bwd + tc - tb
        to = _sync(device)
        clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tr = _sync(device)
        if qk:
            qk.step()
        update_router_bias(model)
        t1 = _sync(device)
        rows.append({"step_s": t1 - t0, "forward_s": fwd, "backward_s": bwd, "optimizer_s": tr - to,
                     "routing_s": router.total + (t1 - tr)})  # fmt: skip
    rows = rows[1:] or rows
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    tokens = cfg.train.global_batch_size * cfg.block_size
    out = {**med, "tokens_per_s": tokens / med["step_s"], "flops_per_token": model.flops_per_token(cfg.block_size),
           "params_total": model.num_params(), "params_active_non_embedding": model.num_active_params(True)}  # fmt: skip
    if device.type == "cuda":
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


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
            t0 = _sync(device)
            with amp:
                y = layer(x)
            y.float().square().mean().backward()
            times.append(_sync(device) - t0)
        res[f"{name}_ms"] = 1000 * statistics.median(times[1:])
    res.update(width=cfg.n_embd, tokens=tokens, experts=moe_cfg.num_experts, top_k=moe_cfg.top_k,
               ratio=res["moe_ms"] / res["dense_ms"])  # fmt: skip
    return res


def run(config: str, overrides: list[str], steps: int, quick: bool) -> dict:
    from kimi.bench.variants import matched_pair
    from kimi.runtime import peak_flops

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kimi_cfg, base_cfg = matched_pair(config, overrides)
    peak = matmul_peak(device, dtype, n=256 if quick else None)
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads",
           "torch": torch.__version__, "config": config, "matmul_peak_flops": peak, "matmul_dtype": str(dtype)}  # fmt: skip
    if device.type == "cuda":
        out["datasheet_peak_flops"] = peak_flops(device)
    for name, cfg in (("nanokimi", kimi_cfg), ("nanogpt", base_cfg)):
        r = step_breakdown(cfg, steps, device)
        r["mfu_measured_peak"] = r["flops_per_token"] * r["tokens_per_s"] / peak
        if out.get("datasheet_peak_flops"):
            r["mfu_datasheet"] = r["flops_per_token"] * r["tokens_per_s"] / out["datasheet_peak_flops"]
        out[name] = r
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
    return "\n".join([
        f"kimi.bench throughput: {r['config']} on {r['device']}, torch {r['torch']}; {peak}", "",
        *md_table(["model", "tokens/s", "MFU (measured peak)", "step ms", "forward", "backward", "optimizer",
                   "routing"], speed), "",
        *md_table(["width", "tokens", "experts (top-k)", "MoE fwd+bwd ms", "dense SwiGLU (same active FLOPs) ms",
                   "MoE/dense"], moe)])  # fmt: skip


def main(args, overrides: list[str]) -> dict:
    config = QUICK_CONFIG if args.quick else args.config
    steps = 2 if args.quick else args.steps
    if steps < 2:
        raise ValueError(f"--steps={steps}: need >= 2 (the first step is warm-up and not counted)")
    r = run(config, overrides, steps, args.quick)
    print(report(r))
    save_json(args.json, r)
    return r
