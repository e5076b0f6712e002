"""`python -m kimi.bench data`: what preparing and loading data costs, against a plain tiktoken script.

    python -m kimi.bench data [--sizes 100M,1G,5G] [--data-workers 1,2] [--work DIR] [--json F]
    python -m kimi.bench data --quick        # 2 MB, the tests' smoke mode

For each size a JSON-lines corpus is generated (documents of 5-80 consecutive lines drawn at random from
the Shakespeare, King James Bible and Wikipedia corpora, so real English text; fixed seed, each size a
prefix of the next), then, each as its own process, timed and measured with exact peak RSS (getrusage):
- `python -m kimi.prepare --files corpus.jsonl` as a user runs it (GPT-2, the 5% hold-out, shards) at
  the largest worker count, on every size: RSS against corpus size;
- prepare and the baseline (kimi/bench/tiktoken_script.py: encode_ordinary_batch + multiprocessing) at
  each worker count on the smallest size: tokens/s per worker and the speed-up with workers;
- the loader (`BatchIterator` over the prepared shards, as `kimi.train` reads them): windows/s, against
  the tokens/s a short real run of `--loader-config` (default configs/nano.yaml) consumes on this machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from kimi.bench.tables import md_table, save_json

SIZE = re.compile(r"^(\d+(?:\.\d+)?)([KMG]?)$", re.I)
QUICK_SIZES = "2M"


def parse_size(text: str) -> int:
    m = SIZE.match(text.strip())
    if not m:
        raise ValueError(f"--sizes: '{text}' is not a size; give e.g. 100M,1G,5G")
    return int(float(m[1]) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m[2].upper()])


def _lines() -> list[str]:
    from kimi.data.corpora import get_corpus

    lines = []
    for name in ("shakespeare", "bible", "wiki"):
        corpus = get_corpus(name)
        for doc in [*corpus.train(), *corpus.val()]:
            lines += [line for line in doc.split("\n") if line.strip()]
    return lines


def make_corpus(path: Path, size: int, seed: int = 0) -> Path:
    """`size` bytes (about) of JSON lines, {"text": ...}; kept and reused when already there."""
    if path.is_file() and path.stat().st_size >= size:
        return path
    lines, rng = _lines(), np.random.default_rng(seed)
    tmp, written = path.with_suffix(".tmp"), 0
    with open(tmp, "w") as f:
        while written < size:
            starts, counts = rng.integers(0, len(lines) - 80, 1024), rng.integers(5, 81, 1024)
            block = "".join(json.dumps({"text": "\n".join(lines[s : s + n])}) + "\n" for s, n in zip(starts, counts))
            f.write(block)
            written += len(block)
    tmp.replace(path)
    return path


def measure(module: str, *args: str) -> dict:
    """Run `python -m kimi.bench.rusage MODULE ARGS`: wall seconds, the main process's exact peak RSS, and
    its workers' peaks (each, and all processes together) sampled every 20 ms."""
    import psutil

    worker_peak = tree_peak = 0
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-m", "kimi.bench.rusage", module, *args], stdout=out, stderr=err)
        while p.poll() is None:
            try:
                main, procs = psutil.Process(p.pid), psutil.Process(p.pid).children(recursive=True)
                rss = [c.memory_info().rss for c in procs]
                tree_peak = max(tree_peak, main.memory_info().rss + sum(rss))
                worker_peak = max([worker_peak, *rss])
            except psutil.Error:
                pass
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if p.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed: {stderr.strip()[-400:]}")
    peak = json.loads(stderr.strip().splitlines()[-1].removeprefix("RUSAGE "))
    return {"wall_s": wall, "stdout": stdout, "self_mb": peak["self_mb"], "children_mb": worker_peak / 2**20,
            "tree_mb": tree_peak / 2**20}  # fmt: skip


def prepare_run(corpus: Path, out: Path, workers: int, val: Path | None = None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    r = measure("kimi.prepare", "--files", str(corpus), *(["--val-files", str(val)] if val else []), "--out", str(out),
                "--num-workers", str(workers), "--no-progress")  # fmt: skip
    tokens = sum(json.loads((out / s / "manifest.json").read_text())["num_tokens"] for s in ("train", "val"))
    what = "kimi.prepare --val-files" if val else "kimi.prepare"
    return {"what": what, "workers": workers, "corpus_mb": corpus.stat().st_size / 2**20,
            "tokens": tokens, "wall_s": r["wall_s"], "tokens_per_s": tokens / r["wall_s"],
            "main_peak_mb": r["self_mb"], "worker_peak_mb": r["children_mb"], "all_peak_mb": r["tree_mb"]}  # fmt: skip


def baseline_run(corpus: Path, out: Path, workers: int) -> dict:
    r = measure("kimi.bench.tiktoken_script", str(corpus), str(out), "--workers", str(workers))
    tokens = json.loads(r["stdout"].strip().splitlines()[-1])["tokens"]
    out.unlink(missing_ok=True)
    return {"what": "tiktoken script", "workers": workers, "corpus_mb": corpus.stat().st_size / 2**20,
            "tokens": tokens, "wall_s": r["wall_s"], "tokens_per_s": tokens / r["wall_s"],
            "main_peak_mb": r["self_mb"], "worker_peak_mb": r["children_mb"], "all_peak_mb": r["tree_mb"]}  # fmt: skip


def loader(dataset: Path, config: str, quick: bool) -> dict:
    """Windows/s of the trainer's data path at the config's batch shape, and what its real step consumes."""
    import torch

    from kimi.bench.throughput import step_breakdown
    from kimi.config import load_config
    from kimi.data.dataset import BatchIterator, ShardDataset

    vocab = ["--model.vocab_size=50304"] if quick else []  # the debug model's 512 ids cannot hold GPT-2's
    cfg = load_config(config, vocab)
    block, batch = cfg.model.block_size, cfg.train.global_batch_size
    it = BatchIterator(ShardDataset(dataset / "train", block), batch, cfg.train.micro_batch_size)
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < (0.5 if quick else 5.0):
        it.next_step()
        steps += 1
    wall = time.perf_counter() - t0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train_tps = step_breakdown(cfg, 3 if quick else 6, device)["tokens_per_s"]  # the trainer's own step
    loader_tps = steps * batch * block / wall
    return {"config": config, "block_size": block, "global_batch": batch, "windows_per_s": steps * batch / wall,
            "loader_tokens_per_s": loader_tps, "train_tokens_per_s": train_tps,
            "loader_share_of_step": train_tps / loader_tps}  # fmt: skip


def run(sizes: list[int], workers: list[int], work: Path, config: str, quick: bool) -> dict:
    import torch

    work.mkdir(parents=True, exist_ok=True)
    corpora = [make_corpus(work / f"corpus_{s >> 20}M.jsonl", s) for s in sorted(sizes)]
    r: dict = {"cpus": os.cpu_count(), "torch": torch.__version__, "tokenizer": "gpt2", "scale": [], "workers": []}
    for corpus in corpora:  # RSS against size, at the most workers
        r["scale"].append(prepare_run(corpus, work / "prepared", max(workers)))
        print(_row(r["scale"][-1]), flush=True)
    for w in workers:  # throughput and scaling on the smallest corpus, both sides in this run
        for fn, out in ((prepare_run, work / "prepared"), (baseline_run, work / "baseline.bin")):
            r["workers"].append(fn(corpora[0], out, w))
            print(_row(r["workers"][-1]), flush=True)
    # without the 5% hold-out's extra reading passes (a val file of the same kind, 1/20 the size)
    val = make_corpus(work / f"val_{sizes[0] >> 20}M.jsonl", min(sizes) // 20, seed=1)
    r["workers"].append(prepare_run(corpora[0], work / "prepared", max(workers), val))
    print(_row(r["workers"][-1]), flush=True)
    prepare_run(corpora[0], work / "prepared", max(workers))
    r["loader"] = loader(work / "prepared", config, quick)
    return r


def _row(x: dict) -> str:
    return (f"{x['what']:<16} {x['corpus_mb']:>8,.0f} MB  workers {x['workers']}  {x['tokens']:>13,} tokens  "
            f"{x['wall_s']:>7.1f} s  {x['tokens_per_s']:>10,.0f} tok/s  RSS main {x['main_peak_mb']:.0f} MB, "
            f"worker {x['worker_peak_mb']:.0f} MB")  # fmt: skip


def report(r: dict) -> str:
    scale = [[f"{x['corpus_mb']:,.0f}", f"{x['tokens']:,}", f"{x['wall_s']:.1f}", f"{x['tokens_per_s']:,.0f}",
              f"{x['main_peak_mb']:.0f}", f"{x['worker_peak_mb']:.0f}", f"{x['all_peak_mb']:.0f}"]
             for x in r["scale"]]  # fmt: skip
    fewest = min(y["workers"] for y in r["workers"])
    one = {x["what"]: x["tokens_per_s"] for x in r["workers"] if x["workers"] == fewest}
    one["kimi.prepare --val-files"] = one["kimi.prepare"]  # its speed-up: against the one-worker hold-out run
    base = {x["workers"]: x["tokens_per_s"] for x in r["workers"] if x["what"] == "tiktoken script"}
    speed = [[x["what"], str(x["workers"]), f"{x['tokens_per_s']:,.0f}", f"{x['tokens_per_s'] / x['workers']:,.0f}",
              f"{x['tokens_per_s'] / one[x['what']]:.2f}x", f"{x['tokens_per_s'] / base[x['workers']]:.2f}x",
              f"{x['main_peak_mb']:.0f} + {x['worker_peak_mb']:.0f}"] for x in r["workers"]]  # fmt: skip
    ld = r["loader"]
    rss = [x["main_peak_mb"] for x in r["scale"]]
    return "\n".join([
        f"kimi.bench data: {r['cpus']} CPUs, tokenizer {r['tokenizer']}, torch {r['torch']}", "",
        "prepare (as `python -m kimi.prepare --files corpus.jsonl` runs), peak RSS against corpus size:",
        *md_table(["corpus MB", "tokens", "s", "tokens/s", "main peak MB", "worker peak MB", "all processes MB"], scale),
        f"main-process peak spread: {100 * (max(rss) / min(rss) - 1):.1f}% (min {min(rss):.0f}, "
        f"max {max(rss):.0f} MB)", "",
        f"throughput on the {r['workers'][0]['corpus_mb']:,.0f} MB corpus, both in this run:",
        *md_table(["program", "workers", "tokens/s", "tokens/s per worker", "speed-up", "vs script", "peak MB main + worker"],
                 speed),
        "", f"loader ({ld['config']}: {ld['global_batch']} windows of {ld['block_size']} per step): "
        f"{ld['windows_per_s']:,.0f} windows/s = {ld['loader_tokens_per_s']:,.0f} tokens/s; its real training step "
        f"here consumes {ld['train_tokens_per_s']:,.0f} tokens/s, so reading is {100 * ld['loader_share_of_step']:.3f}% "
        "of a step"])  # fmt: skip


def main(args, overrides: list[str]) -> dict:
    if overrides:
        raise ValueError(f"kimi.bench data takes no config overrides (got {' '.join(overrides)})")
    sizes = [parse_size(s) for s in (QUICK_SIZES if args.quick else args.sizes).split(",") if s]
    try:
        workers = [int(w) for w in args.data_workers.split(",") if w]
    except ValueError:
        raise ValueError(f"--data-workers={args.data_workers!r}: give worker counts, e.g. 1,2") from None
    if not sizes or not workers or min(workers) < 1:
        raise ValueError("--sizes and --data-workers need at least one value each, workers >= 1")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="kimi-bench-data-"))
    config = "configs/debug.yaml" if args.quick else args.loader_config
    try:
        r = run(sizes, workers, work, config, args.quick)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    save_json(args.json, r)
    print(report(r))
    return r


def add_args(p) -> None:
    p.add_argument("--sizes", default="100M,1G,5G", help="data: corpus sizes to generate (default: %(default)s)")
    p.add_argument("--data-workers", default=",".join(str(w) for w in sorted({1, os.cpu_count() or 1})),
                   help="data: prepare worker counts to compare (default: 1 and the CPU count)")  # fmt: skip
    p.add_argument("--loader-config", default="configs/nano.yaml", help="data: the run the loader is set against")
    p.add_argument("--work", default=None, help="data: keep corpora and shards here (default: a temp dir, removed)")
