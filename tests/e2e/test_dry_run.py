"""--dry-run: sizes and per-GPU memory of a big layout without GPUs; layout errors as one line."""

import subprocess
import sys
from pathlib import Path

from kimi.config import load_config
from kimi.dry_run import memory_plan

ROOT = Path(__file__).resolve().parents[2]


def _run(*args):
    return subprocess.run([sys.executable, "-m", "kimi.train", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def test_medium_dry_run_prints_the_plan():
    res = _run("--config", "configs/medium.yaml", "--dry-run", "--parallel.dp_shard=8", "--parallel.ep=8")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "world 8" in out and "experts per GPU: 2" in out
    for word in ("params", "grads", "optim", "activations", "training FLOPs per step"):
        assert word in out, word
    assert "fsdp2 *" in out and "deepspeed ZeRO-1" in out  # both engines, the configured one marked


def test_deepspeed_memory_zero2_partitions_gradients():
    cfg = load_config(ROOT / "configs" / "medium.yaml", ["--parallel.dp_shard=8", "--parallel.ep=8"])
    z1 = memory_plan(cfg, 8)["engines"]["deepspeed"]
    cfg.parallel.deepspeed.zero_stage = 2
    z2 = memory_plan(cfg, 8)["engines"]["deepspeed"]
    assert z2["grads"] < z1["grads"] / 4 and z2["params"] == z1["params"]


def test_memory_shrinks_with_more_shards():
    p8 = memory_plan(load_config(ROOT / "configs" / "medium.yaml", ["--parallel.dp_shard=8", "--parallel.ep=8"]), 8)
    p16 = memory_plan(load_config(ROOT / "configs" / "medium.yaml", ["--parallel.dp_shard=16", "--parallel.ep=8"]), 16)
    f8, f16 = p8["engines"]["fsdp2"], p16["engines"]["fsdp2"]
    assert f16["grads"] < f8["grads"] and f16["optim"] < f8["optim"]
    assert p8["total"] == p16["total"]
    # Grads are fp32 shards of every parameter: total * 4 bytes / dp_shard.
    assert abs(f8["grads"] - p8["total"] * 4 / 8) < 1


def test_layout_error_is_one_line():
    res = _run("--config", "configs/medium.yaml", "--dry-run", "--parallel.dp_shard=8", "--parallel.ep=3")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and "parallel.ep=3" in res.stderr


def test_batch_that_does_not_split_is_one_line():
    res = _run("--config", "configs/small.yaml", "--dry-run", "--parallel.dp_shard=8", "--train.micro_batch_size=16")
    assert res.returncode == 2 and "not divisible" in res.stderr and len(res.stderr.strip().splitlines()) == 1
