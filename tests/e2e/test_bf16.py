"""bf16 on CPU as the stand-in for the GPU path (no GPU runs CI): what `train.dtype=bf16` does on CUDA,
autocast included, runs here, so dtype faults show before a GPU sees the code.

- Routing and max-logit tracking stay fp32 under bf16 autocast (eager, and compiled + checkpointed):
  exactly equal to an fp32 reference computed from the same inputs.
- A model cast to bf16 keeps its routing and QK-clip state (bias, counts, max logits) in fp32.
- A 10-step debug training in bf16 (one process; and EP=2 over 2 gloo ranks, FSDP2 bf16 parameters)
  has finite losses that track the fp32 run, with evaluation, checkpointing, and QK-clip clipping on
  most steps (low tau), so their bf16 paths run too.
- Generation from the bf16 run's checkpoint, under autocast and with the model cast to bf16: the
  latent cache's decode path gives the logits of a full recompute.

Tolerances. Measured on a shared 2-core CPU (torch 2.13, 10 steps of configs/debug.yaml, QK-clip tau
0.15); each bound is 4-6x the largest value it covers, since bf16 rounding differs between CPUs
(emulated or native bf16) and the gaps grow with every update:
- one process, bf16 vs fp32, max over steps of |dL| / L: 9.9e-5 (val loss 6.6e-5)      -> BF16_RTOL 2e-3
- EP=2 bf16 vs one-process fp32: 3.1e-4                                                -> BF16_RTOL
- EP=2 bf16 vs one-process bf16: 2.6e-4, no tighter than vs fp32: on 2 ranks FSDP2 computes with
  bf16 parameters (param_dtype) and a bf16 residual stream, one process with fp32 parameters under
  autocast, so the two are different precision regimes                                 -> BF16_RTOL
- EP=2 bf16 vs EP=1 bf16 on the same 2 ranks (same regime, only the dispatcher differs): step 1 bit
  for bit (bound 1e-6); 5.1e-5 after 10 steps                                          -> EP_RTOL 3e-4
- generation, relative L2 error of the logits of a 40-token sequence: autocast vs fp32 3.0e-3, bf16
  weights vs fp32 4.8e-3, latent-cache decode vs full recompute in the same precision <= 3.5e-3
                                                                                        -> GEN_RTOL 2e-2
"""

import json
import math
from pathlib import Path

import pytest
import torch

from kimi import load_model
from kimi.config import AttentionConfig, KimiConfig, MoEConfig, ParallelConfig, TrainConfig, load_config
from kimi.generate import Generator
from kimi.model import KimiModel
from kimi.model.attention import MLA, causal_max_logits
from kimi.model.layers import rope_cos_sin
from kimi.model.moe import MoE
from kimi.model.router import Router, route
from kimi.train import train
from tests.dist_utils import run_distributed

ROOT = Path(__file__).resolve().parents[2]
STEPS = 10
BF16_RTOL, EP_RTOL, GEN_RTOL = 2e-3, 3e-4, 2e-2
# Low enough (debug max logits are ~0.15-0.2) that QK-clip rescales heads on most steps, in bf16 too.
QK_TAU = "--optim.qk_clip_tau=0.15"


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def rel(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- routing and max logits


def test_router_scores_are_fp32_under_autocast():
    torch.manual_seed(0)
    router = Router(128, 4)
    torch.nn.init.normal_(router.weight, std=0.02)
    x_TD = torch.randn(64, 128)
    ref_TE = router(x_TD)
    with bf16_autocast():
        got_TE = router(x_TD)
    # Before the fix: bf16 scores, 82 distinct values instead of 256, and 1 token in 64 with another top-2.
    assert got_TE.dtype == torch.float32 and torch.equal(got_TE, ref_TE)
    assert got_TE.unique().numel() == ref_TE.numel()


def _capture_routing(model_or_moe):
    """Wrap each MoE's dispatcher (the model's seam) to record what it is handed."""
    seen = []
    moes = [model_or_moe] if isinstance(model_or_moe, MoE) else model_or_moe.moe_layers()
    for moe in moes:
        inner = moe.dispatcher

        def dispatcher(x_TD, topk_idx_TK, topk_w_TK, experts, inner=inner, moe=moe):
            seen.append((moe, x_TD.detach(), topk_idx_TK, topk_w_TK.detach()))
            return inner(x_TD, topk_idx_TK, topk_w_TK, experts)

        moe.dispatcher = dispatcher
    return seen


def _check_fp32_routing(seen):
    """Each recorded routing equals fp32 routing (no autocast) of the same dispatcher input."""
    assert seen
    for moe, x_TD, idx_TK, w_TK in seen:
        cfg = moe.cfg
        ref_idx_TK, ref_w_TK = route(
            moe.router(x_TD), moe.router.expert_bias, cfg.top_k, cfg.n_group, cfg.topk_group, cfg.norm_topk_prob
        )
        assert w_TK.dtype == torch.float32
        assert torch.equal(idx_TK, ref_idx_TK) and torch.equal(w_TK, ref_w_TK)


def test_moe_routing_and_aux_loss_fp32_under_autocast():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=8, top_k=2, expert_hidden=32, n_group=4, topk_group=2, seq_aux_loss_coef=0.1,
                    aux_loss_coef=0.1, norm_topk_prob=False)  # fmt: skip
    moe = MoE(64, cfg).train()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.05)
    with torch.no_grad():  # a bias on the aux-loss-free update's own 1e-3 grid, finer than bf16 near 0.5
        moe.router.expert_bias.copy_(torch.arange(8) * 1e-3)
    x_BLD = torch.randn(4, 16, 64)
    ref_y = moe(x_BLD)
    ref_aux = moe.aux_loss.detach().clone()
    seen = _capture_routing(moe)
    with bf16_autocast():
        y = moe(x_BLD)
    _check_fp32_routing(seen)
    assert moe.aux_loss.dtype == torch.float32 and torch.equal(moe.aux_loss.detach(), ref_aux)
    assert rel(y, ref_y) < 1e-2  # the experts themselves do run in bf16
    y.sum().backward()  # and the fp32 routing graph backpropagates under autocast
    assert moe.router.weight.grad is not None and moe.router.weight.grad.isfinite().all()


def test_routing_fp32_under_autocast_with_checkpointing_and_compile():
    """The training wrappers (activation checkpointing recomputes the forward in backward; compile
    traces the autocast-off region) keep the routing fp32 too."""
    from kimi.parallel import parallelize

    torch.manual_seed(0)
    cfg = KimiConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=16, intermediate_size=64,
                     attention=dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8),
                     moe=dict(num_experts=4, top_k=2, expert_hidden=16, seq_aux_loss_coef=0.1))  # fmt: skip
    model = KimiModel(cfg)
    train_cfg = TrainConfig(activation_checkpointing=True, compile=True)
    parallelize(model, None, ParallelConfig(), train_cfg, compile_backend="aot_eager")
    seen = _capture_routing(model)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with bf16_autocast():
        out = model(idx, idx)
    out.loss.backward()
    _check_fp32_routing(seen)
    assert out.aux_loss.dtype == torch.float32


def test_max_logits_fp32_under_autocast():
    g = torch.Generator().manual_seed(0)
    q_BHTd = torch.randn(2, 4, 16, 48, generator=g).bfloat16()
    k_BHSd = torch.randn(2, 4, 16, 48, generator=g).bfloat16()
    ref_H = causal_max_logits(q_BHTd.float(), k_BHSd.float(), 0.144)
    with bf16_autocast():
        got_H = causal_max_logits(q_BHTd, k_BHSd, 0.144)
    assert torch.equal(got_H, ref_H)  # before: rounded to bf16 (e.g. 2.9661 -> 2.9688)

    # In the module: what a training forward records is the fp32 max of the q/k it attended with.
    torch.manual_seed(0)
    cfg = AttentionConfig(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    mla = MLA(32, 4, cfg).train()
    for p in mla.parameters():
        torch.nn.init.normal_(p, std=0.5)  # logits of a few units: bf16 would round them by ~1e-2
    seen = {}
    record = mla._record
    mla._record = lambda q, k: (seen.update(q=q, k=k), record(q, k))
    cos, sin = rope_cos_sin(torch.arange(12), mla.rope_dim, cfg.rope_theta)
    with bf16_autocast():
        mla(torch.randn(2, 12, 32, generator=g), cos, sin)
    assert seen["q"].dtype == torch.bfloat16  # the attention itself ran in bf16
    ref_H = causal_max_logits(seen["q"].float(), seen["k"].float(), mla.softmax_scale)
    assert torch.equal(mla.max_logits_H, ref_H)


def test_routing_state_stays_fp32_when_the_model_is_cast_to_bf16():
    """`model.bfloat16()` (bf16 inference; DeepSpeed's bf16 engine before 0.19.2 calls it) must not cast
    the routing and QK-clip state: bf16 counts are exact only up to 256, a bf16 bias above 0.25 moves
    in steps of 2e-3 (the update is 1e-3), and a bf16 max logit is off by up to 0.4%."""
    cfg = load_config(ROOT / "configs" / "debug.yaml", []).model
    torch.manual_seed(0)
    model = KimiModel(cfg)
    moe = model.moe_layers()[0]
    bias_E = 0.3 + torch.arange(cfg.moe.num_experts) * 1e-3  # a bias after a few hundred updates
    with torch.no_grad():
        moe.router.expert_bias.copy_(bias_E)
    model.bfloat16()
    assert model.lm_head.weight.dtype == torch.bfloat16  # the cast did happen ...
    assert moe.router.expert_bias.dtype == torch.float32 and torch.equal(moe.router.expert_bias, bias_E)  # ... not here
    seen = _capture_routing(model)
    model.train()(torch.randint(0, cfg.vocab_size, (16, cfg.block_size)))  # 1024 tokens: ~512 per expert
    counts_E = torch.bincount(seen[0][2].reshape(-1), minlength=cfg.moe.num_experts).float()
    assert counts_E.max() > 256 and torch.equal(moe.tokens_per_expert, counts_E)
    for attn in model.attention_layers():
        assert attn.max_logits_H.dtype == torch.float32 and attn.max_logits_H.max() > 0
    moe.update_bias()
    assert moe.router.expert_bias.dtype == torch.float32
    assert torch.equal(moe.router.expert_bias, bias_E + 1e-3 * torch.sign(counts_E.mean() - counts_E))


# ----------------------------------------------------------------------------- training


def _overrides(out, dtype, *extra):
    return [
        f"--train.out_dir={out}",
        "--logging.mlflow=false",
        f"--train.max_steps={STEPS}",
        "--train.eval_interval=5",  # evaluation under autocast too
        f"--train.dtype={dtype}",
        QK_TAU,
        *extra,
    ]


def _cfg(out, dtype, *extra):
    return load_config(ROOT / "configs" / "debug.yaml", _overrides(out, dtype, *extra))


def _rows(out) -> list[dict]:
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return rows


def _losses(out) -> list[float]:
    losses = [r["loss"] for r in _rows(out)]
    assert all(math.isfinite(x) for x in losses), losses
    return losses


def _max_rel_gap(a, b) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def _val_losses(out) -> list[float]:
    return [r["val_loss"] for r in _rows(out) if "val_loss" in r]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The one-process debug runs, fp32 and bf16: {dtype: run dir}."""
    runs = {}
    for dtype in ("fp32", "bf16"):
        runs[dtype] = tmp_path_factory.mktemp(dtype) / "run"
        train(_cfg(runs[dtype], dtype))
    return runs


def test_bf16_training_tracks_fp32(single):
    fp32, bf16 = _losses(single["fp32"]), _losses(single["bf16"])
    gap = _max_rel_gap(bf16, fp32)
    val_gap = _max_rel_gap(_val_losses(single["bf16"]), _val_losses(single["fp32"]))
    print(f"one process, bf16 vs fp32 over {STEPS} steps: max rel loss gap {gap:.2e}, val {val_gap:.2e}")
    assert gap < BF16_RTOL and val_gap < BF16_RTOL
    assert bf16[-1] < bf16[0] - 1.0  # it trains
    rows = _rows(single["bf16"])
    assert sum(r["qk_clipped_heads"] > 0 for r in rows) >= STEPS // 2  # QK-clip acted in bf16
    assert all(math.isfinite(r["grad_norm"]) and math.isfinite(r["max_attn_logit"]) for r in rows)


def _ep_rank(rank, world, out_ep2, out_ep1):
    """EP=2 then FSDP-only (EP=1), both bf16, in the same two processes (one spawn, one process group)."""
    train(_cfg(out_ep2, "bf16", "--parallel.ep=2"))
    train(_cfg(out_ep1, "bf16", "--parallel.ep=1"))


def test_ep2_bf16_matches_single_process(single, tmp_path):
    ep2, ep1 = tmp_path / "ep2", tmp_path / "ep1"
    run_distributed(_ep_rank, 2, args=(str(ep2), str(ep1)), timeout=600)
    ep2_losses, ep1_losses = _losses(ep2), _losses(ep1)
    fp32, bf16 = _losses(single["fp32"]), _losses(single["bf16"])
    gaps = {
        "vs one-process fp32": _max_rel_gap(ep2_losses, fp32),
        "vs one-process bf16": _max_rel_gap(ep2_losses, bf16),
        "vs EP=1 (2 ranks, bf16)": _max_rel_gap(ep2_losses, ep1_losses),
    }
    print("EP=2 bf16, max rel loss gap over", STEPS, "steps:", {k: f"{v:.2e}" for k, v in gaps.items()})
    assert gaps["vs one-process fp32"] < BF16_RTOL and gaps["vs one-process bf16"] < BF16_RTOL
    assert gaps["vs EP=1 (2 ranks, bf16)"] < EP_RTOL
    # Before any update only the dispatcher differs. Measured: bit for bit; the bound allows for a GEMM
    # whose rounding depends on the rows per expert, and fails a dispatcher that returns fp32 (7e-6).
    assert abs(ep2_losses[0] - ep1_losses[0]) <= 1e-6 * ep1_losses[0]
    assert sum(r["qk_clipped_heads"] > 0 for r in _rows(ep2)) >= STEPS // 2
    assert all(r["a2a_MB"] > 0 for r in _rows(ep2))


# ----------------------------------------------------------------------------- generation


def _teacher_forced_logits(model, ids_T: list[int], prefill: int):
    """Logits at every position: prefill the cache with the first `prefill` tokens, then decode one at a
    time (the absorbed MLA path), as Generator does. Returns (cached, full recompute), each (T, V)."""
    ids = torch.tensor([ids_T])
    cache = model.new_cache(1, len(ids_T))
    parts = [model(ids[:, :prefill], cache=cache, start_pos=0).logits[0]]
    for p in range(prefill, len(ids_T)):
        parts.append(model(ids[:, p : p + 1], cache=cache, start_pos=p).logits[0])
    return torch.cat(parts), model(ids).logits[0]


@torch.no_grad()
def test_generation_from_bf16_checkpoint(single):
    model = load_model(str(single["bf16"] / "checkpoints" / "latest")).eval()
    ids_T = torch.randint(0, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    ref_cached, ref_full = _teacher_forced_logits(model, ids_T, prefill=8)
    assert rel(ref_cached, ref_full) < 1e-5  # fp32: the absorbed decode path is the same function

    with bf16_autocast():
        ac_cached, ac_full = _teacher_forced_logits(model, ids_T, prefill=8)
    bf16_model = load_model(str(single["bf16"] / "checkpoints" / "latest")).eval().bfloat16()
    bf_cached, bf_full = _teacher_forced_logits(bf16_model, ids_T, prefill=8)
    assert bf16_model.new_cache(1, 4).layers[0].c_kv_BSC.dtype == torch.bfloat16  # a bf16 latent cache
    errs = {
        "autocast full vs fp32": rel(ac_full, ref_full),
        "autocast cached vs full": rel(ac_cached, ac_full),
        "bf16 weights full vs fp32": rel(bf_full, ref_full),
        "bf16 weights cached vs full": rel(bf_cached, bf_full),
    }
    print("generation, relative L2 logit errors:", {k: f"{v:.1e}" for k, v in errs.items()})
    for k, v in errs.items():
        assert v < GEN_RTOL, k
    for out in (ac_cached, ac_full, bf_cached, bf_full):
        assert out.isfinite().all()

    # And through Generator itself, sampling with the cache in both precisions.
    prompt = ids_T[:5]
    with bf16_autocast():
        a = Generator(model).generate(prompt, 20, temperature=1.0, seed=3)
    b = Generator(bf16_model).generate(prompt, 20, temperature=1.0, seed=3)
    for toks in (a, b):
        assert len(toks) == 20 and all(0 <= t < model.config.vocab_size for t in toks)
