"""train.fused_elementwise: the torch.compile'd (inductor, real C++ codegen) elementwise chains against the eager
functions they copy, alone and inside a model, forward and backward, fp32.

Inductor fuses each chain into one loop and may reorder its reductions (RMSNorm's mean over D; the weight
gradients' sums over rows), so results agree to rounding, not bit for bit. Measured here: <= 1.5e-7 (functions) and 3.3e-7 (model) relative
to each tensor's largest entry; the bound is 1e-6.
"""

from __future__ import annotations

import copy

import pytest
import torch

from kimi.config import KimiConfig
from kimi.model import KimiModel
from kimi.model.elementwise import ELEMENTWISE
from kimi.model.layers import MLP, RMSNorm
from kimi.model.moe import GroupedExperts
from kimi.parallel.parallelize import apply_fused_elementwise, fused_elementwise

REL = 1e-6


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _inputs(name: str) -> tuple:
    g = torch.Generator().manual_seed(0)
    if name == "rms_norm":
        return torch.randn(3, 10, 48, generator=g), torch.randn(48, generator=g), 1e-6
    gate, up = torch.randn(37, 24, generator=g), torch.randn(37, 24, generator=g)
    return (gate, up) if name == "swiglu" else (gate, up, torch.rand(37, generator=g))


@pytest.mark.parametrize("name", ELEMENTWISE._fields)
def test_fused_function_matches_eager(name):
    eager, fused = getattr(ELEMENTWISE, name), getattr(fused_elementwise("inductor"), name)
    args = _inputs(name)
    outs, grads = [], []
    for fn in (eager, fused):
        leaves = [a.clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
        out = fn(*leaves)
        out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out))
        outs.append(out.detach())
        grads.append([a.grad for a in leaves if isinstance(a, torch.Tensor)])
    assert _rel_err(outs[1], outs[0]) <= REL
    for g_fused, g_eager in zip(grads[1], grads[0]):
        assert _rel_err(g_fused, g_eager) <= REL


def test_fused_model_matches_eager():
    """A model with every kind of caller (RMSNorm, a dense SwiGLU layer, the shared expert, routed experts on the
    grouped GEMM with their rows weighted): loss and every gradient match the eager model's."""
    torch.manual_seed(0)
    cfg = KimiConfig(
        n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=16, intermediate_size=64,
        attention=dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8),
        moe=dict(num_experts=4, top_k=2, expert_hidden=16, n_shared_experts=1, first_k_dense_replace=1),
    )  # fmt: skip
    ref = KimiModel(cfg)
    ref.init_weights()
    model = copy.deepcopy(ref)
    apply_fused_elementwise(model)
    fused = fused_elementwise("inductor")
    callers = [m for m in model.modules() if isinstance(m, (RMSNorm, MLP, GroupedExperts))]
    assert {type(m) for m in callers} == {RMSNorm, MLP, GroupedExperts}
    assert all(m.elementwise is fused for m in callers)

    idx = torch.randint(0, 64, (2, 16))
    ref_loss, loss = ref(idx, idx).loss, model(idx, idx).loss
    ref_loss.backward()
    loss.backward()
    assert abs(float(loss) - float(ref_loss)) <= REL * abs(float(ref_loss))
    ref_params = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        assert _rel_err(p.grad, ref_params[n].grad) <= REL, n
