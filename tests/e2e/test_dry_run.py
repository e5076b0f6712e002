"""--dry-run: sizes and per-GPU memory of a big layout without GPUs; layout errors as one line."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kimi.config import load_config
from kimi.dry_run import memory_plan
from kimi.model import KimiModel
from kimi.optim.muon import param_group_name

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
    """Both stages keep only their partition's gradients to the step; ZeRO-1 holds the rank's full gradients
    inside it (reduced after backward), ZeRO-2 only its reduce bucket."""
    cfg = load_config(ROOT / "configs" / "medium.yaml", ["--parallel.dp_shard=8", "--parallel.ep=8"])
    z1 = memory_plan(cfg, 8)["engines"]["deepspeed"]
    cfg.parallel.deepspeed.zero_stage = 2
    z2 = memory_plan(cfg, 8)["engines"]["deepspeed"]
    assert z2["grads"] == z1["grads"] and z2["params"] == z1["params"]
    assert z1["buffers"] > z2["buffers"] + 4 * z2["grads"]


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


def test_absurd_depth_answers_at_once():
    """`--model.n_layer=100000` built 100000 blocks on the meta device: past 2.7 GB and still going after
    150 s, printing nothing. The sizes come from a few layers now; the run must end well inside the limit."""
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "kimi.train", "--config", "configs/debug.yaml", "--dry-run",
                          "--model.n_layer=100000"], cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert time.monotonic() - t0 < 30, time.monotonic() - t0
    cfg = load_config(ROOT / "configs" / "debug.yaml", ["--model.n_layer=100000"])
    assert f"parameters: total {memory_plan(cfg, 1)['total']:,} |" in res.stdout


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["--model.n_layer=5", "--moe.first_k_dense_replace=2"],
        ["--model.n_layer=3", "--moe.first_k_dense_replace=3"],
        ["--model.n_layer=4", "--moe.use_moe=false"],
        ["--model.n_layer=3", "--attention.type=mha", "--model.tie_embeddings=true"],
    ],
    ids=["debug", "dense-then-moe", "all-dense-k", "no-moe", "mha-tied"],
)
def test_sizes_from_a_few_layers_equal_the_whole_model(overrides):
    """memory_plan counts a few layers of each kind and scales them; the whole model built on the meta
    device gives the same numbers."""
    cfg = load_config(ROOT / "configs" / "debug.yaml", overrides)
    plan = memory_plan(cfg, 1)
    with torch.device("meta"):
        model = KimiModel(cfg.model)
    T = cfg.block_size
    assert plan["total"] == model.num_params()
    assert plan["active"] == model.num_active_params()
    assert plan["non_embedding"] == model.num_params(non_embedding=True)
    assert plan["expert_params"] == sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert plan["flops_per_step"] == model.flops_per_token(T) * cfg.train.global_batch_size * T
    assert plan["sizes"]["muon"] == sum(
        p.numel() for n, p in model.named_parameters() if param_group_name(n, p, cfg.optim) == "muon"
    )
    assert plan["sizes"]["block_params"] == max(sum(p.numel() for p in b.parameters()) for b in model.layers)


def test_recompute_switches_take_out_what_they_rebuild():
    """moe.recompute: the gathered rows and silu(W1x) per routed row (under EP only the latter: the received
    rows stay); attention.recompute_kv: MLA's expanded K/V but the rope key, per token and layer."""

    def act(*overrides, world=1):
        cfg = load_config(ROOT / "configs" / "bench" / "byte.yaml", ["--train.micro_batch_size=8", *overrides])
        return memory_plan(cfg, world)["sizes"]["activations"]

    m = load_config(ROOT / "configs" / "bench" / "byte.yaml").model
    a, tokens, n_moe = m.attention, 8 * m.block_size, m.n_layer - m.moe.first_k_dense_replace
    per_row = 2 * m.moe.top_k * tokens * n_moe  # bytes of one value per routed row, over the MoE layers
    assert act() - act("--moe.recompute=true") == per_row * (m.n_embd + m.moe.expert_hidden)
    ep = ["--parallel.dp_shard=2", "--parallel.ep=2"]
    assert act(*ep, world=2) - act(*ep, "--moe.recompute=true", world=2) == per_row * m.moe.expert_hidden
    kv = m.n_head * (2 * a.qk_nope_head_dim + a.v_head_dim + a.qk_rope_head_dim) - a.qk_rope_head_dim
    assert act() - act("--attention.recompute_kv=true") == 2 * kv * tokens * m.n_layer
