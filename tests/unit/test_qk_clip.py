"""QK-clip against a stand-in attention module that follows the model's contract, and the real MLA/MHA."""

import math

import pytest
import torch
from torch import nn

from kimi.model import attention
from kimi.optim.qk_clip import QKClip, scale_rows_


class StandInMLA(nn.Module):
    """MLA-shaped logits without the latent: per head q rows [nope n | rope r], k_nope rows n per head,
    one k_rope shared by all heads. logit_h = (q_nope.k_nope + q_rope.k_rope) * scale."""

    def __init__(self, D=16, H=4, n=8, r=4):
        super().__init__()
        self.H, self.n, self.r, self.scale = H, n, r, (n + r) ** -0.5
        self.q_proj = nn.Linear(D, H * (n + r), bias=False)
        self.k_nope = nn.Linear(D, H * n, bias=False)
        self.k_rope = nn.Linear(D, r, bias=False)
        self.register_buffer("max_logits_H", torch.full((H,), float("-inf")), persistent=False)

    def logits_BHTT(self, x_BTD):
        B, T, _ = x_BTD.shape
        qn_BTHn, qr_BTHr = self.q_proj(x_BTD).view(B, T, self.H, -1).split([self.n, self.r], -1)
        kn_BTHn = self.k_nope(x_BTD).view(B, T, self.H, self.n)
        kr_BTr = self.k_rope(x_BTD)
        s = torch.einsum("bthn,bshn->bhts", qn_BTHn, kn_BTHn) + torch.einsum("bthr,bsr->bhts", qr_BTHr, kr_BTr)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        return (s * self.scale).masked_fill(~causal, float("-inf"))

    def forward(self, x_BTD):
        with torch.no_grad():
            self.max_logits_H.copy_(torch.maximum(self.max_logits_H, self.logits_BHTT(x_BTD).amax(dim=(0, 2, 3))))

    def reset_max_logits(self):
        self.max_logits_H.fill_(float("-inf"))

    def qk_clip_scales(self, gamma_H):
        sq_H1, g_H1 = gamma_H.sqrt()[:, None], gamma_H[:, None]
        q = torch.cat([sq_H1.expand(self.H, self.n), g_H1.expand(self.H, self.r)], 1).reshape(-1)
        return [(self.q_proj.weight, q), (self.k_nope.weight, sq_H1.expand(self.H, self.n).reshape(-1))]


def _boosted(seed, hot=(0, 2), boost=6.0):
    torch.manual_seed(seed)
    m = StandInMLA()
    with torch.no_grad():
        for h in hot:  # make these heads' logits large
            m.q_proj.weight.view(m.H, -1, 16)[h] *= boost
            m.k_nope.weight.view(m.H, -1, 16)[h] *= boost
    return m


def test_clipped_heads_rescaled_others_bit_identical():
    m, x = _boosted(0), torch.randn(2, 10, 16, generator=torch.Generator().manual_seed(1))
    m(x)
    before = m.max_logits_H.clone()
    tau = float(before[[1, 3]].max() + before[[0, 2]].min()) / 2  # between the cold and the hot heads
    assert (before[[0, 2]] > tau).all() and (before[[1, 3]] < tau).all()
    q0, kn0, kr0 = m.q_proj.weight.detach().clone(), m.k_nope.weight.detach().clone(), m.k_rope.weight.detach().clone()
    stats = QKClip([m], tau=tau).step()
    assert stats == {"max_logit": pytest.approx(before.max().item()), "clipped_heads": 2}
    assert torch.isinf(m.max_logits_H).all()  # reset
    q, kn = m.q_proj.weight.view(4, 12, 16), m.k_nope.weight.view(4, 8, 16)
    for h in range(4):
        if h in (1, 3):
            assert torch.equal(q[h], q0.view(4, 12, 16)[h]) and torch.equal(kn[h], kn0.view(4, 8, 16)[h])
        else:
            g = tau / before[h]
            torch.testing.assert_close(q[h, :8], q0.view(4, 12, 16)[h, :8] * g.sqrt(), rtol=1e-6, atol=0)
            torch.testing.assert_close(q[h, 8:], q0.view(4, 12, 16)[h, 8:] * g, rtol=1e-6, atol=0)
            torch.testing.assert_close(kn[h], kn0.view(4, 8, 16)[h] * g.sqrt(), rtol=1e-6, atol=0)
    assert torch.equal(m.k_rope.weight, kr0)  # shared rope key: never scaled
    m(x)  # the same inputs now peak at exactly tau on the clipped heads
    after = m.max_logits_H
    torch.testing.assert_close(after[[0, 2]], torch.full((2,), tau), rtol=1e-4, atol=0)
    torch.testing.assert_close(after[[1, 3]], before[[1, 3]], rtol=1e-6, atol=0)


def test_untouched_modules_and_one_reduce_over_all_layers():
    hot, cold = _boosted(0), _boosted(1, hot=())
    x = torch.randn(2, 10, 16)
    hot(x), cold(x)
    calls = []
    cold.qk_clip_scales = lambda g: calls.append("cold") or []

    def reduce_fn(t):  # stands in for an all-reduce MAX: another rank saw a bigger logit in cold head 3
        calls.append(t.shape)
        t[7] = 1e4

    stats = QKClip([hot, cold], tau=1e3, reduce_fn=reduce_fn).step()
    assert calls == [torch.Size([8]), "cold"]  # one reduce over both layers; cold clipped via reduced max
    assert stats["max_logit"] == 1e4 and stats["clipped_heads"] == 1
    cold2 = _boosted(2, hot=())
    cold2(x)
    w = cold2.q_proj.weight.detach().clone()
    cold2.qk_clip_scales = lambda g: pytest.fail("qk_clip_scales called on a module with no clipped head")
    assert QKClip([cold2], tau=1e6).step()["clipped_heads"] == 0
    assert torch.equal(cold2.q_proj.weight, w)


def test_bad_inputs():
    with pytest.raises(ValueError, match="tau"):
        QKClip([], tau=0)
    with pytest.raises(TypeError, match="lacks"):
        QKClip([nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="scale of 3 rows"):
        scale_rows_(nn.Parameter(torch.ones(4, 2)), torch.ones(3))


@pytest.mark.parametrize("kind,q_lora", [("mla", None), ("mla", 16), ("mha", None)])
def test_real_attention_module(kind, q_lora):
    from kimi.config import AttentionConfig
    from kimi.model.layers import rope_cos_sin

    torch.manual_seed(0)
    cfg = AttentionConfig(type=kind, q_lora_rank=q_lora, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                          v_head_dim=8, bias=kind == "mha")  # fmt: skip
    m = (attention.MLA if kind == "mla" else attention.MHA)(32, 4, cfg).train()
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 2:
                p.mul_(4.0)  # big logits everywhere ...
        q = m.q_proj.weight if q_lora is None else m.q_b_proj.weight
        q.view(4, -1, q.shape[1])[1] *= 0.05  # ... except head 1
    x = torch.randn(2, 12, 32)
    cos, sin = rope_cos_sin(torch.arange(12), m.rope_dim, cfg.rope_theta)
    m(x, cos, sin)
    before = m.max_logits_H.clone()
    tau = float(before[1]) * 1.5
    assert (before[[0, 2, 3]] > tau).all() and before[1] < tau
    w0 = {n: p.detach().clone() for n, p in m.named_parameters()}
    assert QKClip([m], tau=tau).step()["clipped_heads"] == 3
    m(x, cos, sin)
    after = m.max_logits_H
    torch.testing.assert_close(after[[0, 2, 3]], torch.full((3,), tau), rtol=1e-4, atol=0)
    torch.testing.assert_close(after[1], before[1], rtol=1e-5, atol=0)
    for p, scale in m.qk_clip_scales(torch.tensor([0.5, 1.0, 0.5, 0.5])):  # head 1's rows are exactly 1.0
        name = next(n for n, q in m.named_parameters() if q is p)
        rows = p.view(4, -1, *p.shape[1:])[1] if p.ndim == 2 else p.view(4, -1)[1]
        old = w0[name].view(4, -1, *p.shape[1:])[1] if p.ndim == 2 else w0[name].view(4, -1)[1]
        assert torch.equal(rows, old), name
        assert math.isclose(float(scale.view(4, -1)[1].min()), 1.0) and float(scale.view(4, -1)[1].max()) == 1.0
