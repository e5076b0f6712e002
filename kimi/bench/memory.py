"""python -m kimi.bench memory [--config configs/nano.yaml] [--contexts 1024,...,32768] [--json out.json] [--quick]

KV cache       bytes per token (all layers, one sequence, bf16) of the config's MLA and of the same model
               with MHA, and the memory measured for a cache of each context length: on GPU the allocator's
               peak during a prefill of the whole context plus decode steps, on CPU the cache's own tensors
               (a 32k prefill does not fit a CPU's time budget)
generation     tokens/s of greedy decoding with the cache (one token per forward) and without (the whole
               prefix recomputed per token), MLA and MHA
training       peak memory of a few training steps of the config's model and of its nanoGPT-equivalent
               (GPU: allocator peak; CPU: how far a fresh process's peak RSS grows while it trains,
               above what starting Python and importing torch took), and that per parameter
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

from kimi.bench.tables import md_table, save_json
from kimi.config import load_config

QUICK_CONFIG = "configs/debug.yaml"


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _model(config: str, overrides: list[str], block_size: int, attn: str, device):
    from kimi.model import KimiModel

    cfg = load_config(config, [*overrides, f"--model.block_size={block_size}", f"--attention.type={attn}"])
    torch.manual_seed(0)
    return KimiModel(cfg.model).to(device).eval()


@torch.no_grad()
def kv_cache(config: str, overrides: list[str], contexts: list[int], decode: int) -> list[dict]:
    dev = _device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    rows = []
    for attn in ("mla", "mha"):
        model = _model(config, overrides, max(contexts), attn, dev).to(dtype)
        for ctx in contexts:
            row = {"attention": attn, "context": ctx, "bytes_per_token_bf16": model.kv_cache_bytes_per_token()}
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
                base = torch.cuda.memory_allocated(dev)
                cache = model.new_cache(1, ctx)
                prompt = torch.randint(0, model.config.vocab_size, (1, ctx - decode), device=dev)
                nxt = model(prompt, cache=cache).logits[:, -1:].argmax(-1)
                for i in range(decode):
                    nxt = model(nxt, cache=cache, start_pos=ctx - decode + i).logits[:, -1:].argmax(-1)
                row["measured_bytes"] = torch.cuda.max_memory_allocated(dev) - base
                row["cache_bytes"] = cache.nbytes()
            else:
                row["cache_bytes"] = row["measured_bytes"] = model.new_cache(1, ctx).nbytes()
            rows.append(row)
    return rows


@torch.no_grad()
def generation_speed(config: str, overrides: list[str], prompt_len: int, new_tokens: int) -> list[dict]:
    dev = _device()
    rows = []
    for attn in ("mla", "mha"):
        model = _model(config, overrides, prompt_len + new_tokens, attn, dev)
        prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), device=dev)
        for cached in (True, False):
            t0 = time.perf_counter()
            idx = prompt
            cache = model.new_cache(1, prompt_len + new_tokens) if cached else None
            logits = model(idx, cache=cache).logits
            for _ in range(new_tokens - 1):
                nxt = logits[:, -1:].argmax(-1)
                idx = torch.cat([idx, nxt], 1)
                logits = model(nxt, cache=cache, start_pos=idx.shape[1] - 1).logits if cached else model(idx).logits
            if dev.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            rows.append({"attention": attn, "cache": cached, "prompt": prompt_len, "new_tokens": new_tokens,
                         "tokens_per_s": new_tokens / dt})  # fmt: skip
    return rows


# A CPU child trains and prints its peak RSS before and after: the difference is what training added
# on top of the interpreter and torch: weights, grads, optimizer state, activations (one fresh process per
# model, so one peak cannot hide another). glibc's malloc raises its mmap threshold each time a large
# block is freed, after which big tensors come from the heap and freed ones stay resident, fragmented: the
# same run's peak RSS then moved by +-15% between runs. A fixed threshold (which stops that adjustment)
# maps every tensor over 128 KiB and returns it on free, so the peak is what was live, run after run.
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
_CHILD = """import json, sys, torch
from kimi.bench.tables import vm_hwm
from kimi.bench.throughput import step_breakdown
from kimi.config import config_from_dict
cfg = config_from_dict(json.loads(sys.argv[2]))
before = vm_hwm()
step_breakdown(cfg, int(sys.argv[1]), torch.device("cpu"))
print(json.dumps([before, vm_hwm()]))"""


def training_memory(config: str, overrides: list[str], steps: int) -> list[dict]:
    """Peak memory of `steps` training steps: GPU allocator peak, or on CPU a fresh process's RSS growth."""
    from kimi.bench.variants import baseline_at_total, matched_pair, param_counts

    rows = []
    models = (*matched_pair(config, overrides), baseline_at_total(config, overrides))
    for name, c in zip(("nanokimi", "nanogpt (equal active)", "nanogpt (equal total)"), models):
        params = param_counts(c)["params_total"]
        if torch.cuda.is_available():
            from kimi.bench.throughput import step_breakdown

            peak, what = step_breakdown(c, steps, _device())["peak_memory_bytes"], "GPU allocator peak"
        else:
            tree = c.to_dict()
            cmd = [sys.executable, "-c", _CHILD, str(steps), json.dumps(tree)]
            p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **_MALLOC_ENV})
            if p.returncode != 0:
                raise RuntimeError(f"training-memory child failed: {p.stderr.strip()[-300:]}")
            before, after = json.loads(p.stdout.strip().splitlines()[-1])
            peak, what = after - before, "peak RSS growth while training (CPU)"
        rows.append({"model": name, "params_total": params, "peak_bytes": peak, "bytes_per_param": peak / params,
                     "what": what})  # fmt: skip
    for r in rows:
        r["vs_nanokimi"] = r["peak_bytes"] / rows[0]["peak_bytes"]
    return rows


def report(r: dict) -> str:
    mb = 2**20
    kv = [[k["attention"], str(k["context"]), f"{k['bytes_per_token_bf16']:,}", f"{k['cache_bytes'] / mb:.2f}",
           f"{k['measured_bytes'] / mb:.2f}"] for k in r["kv_cache"]]  # fmt: skip
    gen = [[g["attention"], "yes" if g["cache"] else "no", f"{g['prompt']} + {g['new_tokens']}",
            f"{g['tokens_per_s']:,.1f}"] for g in r["generation"]]  # fmt: skip
    train = [[t["model"], f"{t['params_total'] / 1e6:.2f}M", f"{t['peak_bytes'] / mb:.0f}", f"{t['bytes_per_param']:.1f}",
              f"{1 / t['vs_nanokimi']:.2f}", t["what"]] for t in r["training"]]  # fmt: skip
    return "\n".join([
        f"kimi.bench memory: {r['config']} on {r['device']}, torch {r['torch']}", "",
        *md_table(["attention", "context", "KV bytes/token (bf16)", "cache MB (model dtype)", "measured MB"], kv), "",
        *md_table(["attention", "cache", "prompt + new", "tokens/s"], gen), "",
        *md_table(["model", "params", "peak training MB", "bytes/param", "nanokimi / this", "measured as"], train)])  # fmt: skip


def main(args, overrides: list[str]) -> dict:
    config = QUICK_CONFIG if args.quick else args.config
    try:
        contexts = [int(c) for c in args.contexts.split(",") if c]
    except ValueError:
        raise ValueError(
            f"--contexts={args.contexts!r}: give comma-separated context lengths, e.g. 1024,4096"
        ) from None
    if args.quick:
        contexts, prompt, new, steps = [64, 128], 16, 8, 2
    else:
        prompt, new, steps = args.prompt_len, args.new_tokens, args.steps
    if not contexts or min(contexts) <= 8:
        raise ValueError(f"--contexts={args.contexts!r}: give comma-separated context lengths > 8, e.g. 1024,4096")
    dev = _device()
    r = {"config": config, "torch": torch.__version__,
         "device": torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads",
         "kv_cache": kv_cache(config, overrides, contexts, decode=8),
         "generation": generation_speed(config, overrides, prompt, new),
         "training": training_memory(config, overrides, steps)}  # fmt: skip
    print(report(r))
    save_json(args.json, r)
    return r


def add_args(p) -> None:
    p.add_argument("--contexts", default="1024,2048,4096,8192,16384,32768", help="memory: KV-cache context lengths")
    p.add_argument("--prompt-len", type=int, default=128, help="memory: generation prompt length")
    p.add_argument("--new-tokens", type=int, default=64, help="memory: generated tokens per speed measurement")
    p.add_argument(
        "--json", default=None, help="throughput/memory/checkpoint: also write the numbers to this JSON file"
    )
