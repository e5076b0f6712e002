"""bf16 on CPU as the stand-in for the GPU path (no GPU runs CI): what `train.dtype=bf16` does on CUDA,
autocast included, runs here, so dtype faults show before a GPU sees the code.

- Routing and max-logit tracking stay fp32 under bf16 autocast (eager, and compiled + checkpointed):
  exactly equal to an fp32 reference computed from the same inputs.
- A model cast to bf16 keeps its routing and QK-clip state (bias, counts, max logits) in fp32.
"""

from pathlib import Path

import torch

from kimi.config import AttentionConfig, KimiConfig, MoEConfig, ParallelConfig, TrainConfig, load_config
from kimi.model import KimiModel
from kimi.model.attention import MLA, causal_max_logits
from kimi.model.layers import rope_cos_sin
from kimi.model.moe import MoE
from kimi.model.router import Router, route

ROOT = Path(__file__).resolve().parents[1]


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
