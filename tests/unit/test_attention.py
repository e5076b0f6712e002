"""MLA / MHA: shapes, causality, the latent cache and absorbed decode, max-logit tracking, QK-clip scales."""

import pytest
import torch

import kimi.model.attention as attention
from kimi.config import AttentionConfig, KimiConfig
from kimi.model import MHA, MLA, KimiModel, layers
from kimi.model.layers import apply_rope, rope_cos_sin

D, H = 64, 4


def mla_cfg(q_lora_rank=None, **kw):
    return AttentionConfig(
        type="mla",
        q_lora_rank=q_lora_rank,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=12,
        **kw,
    )


def model(att: str, q_lora_rank=None, use_moe=True, seed=0):
    torch.manual_seed(seed)
    cfg = KimiConfig(
        n_layer=2,
        n_head=H,
        n_embd=D,
        vocab_size=128,
        block_size=32,
        attention=mla_cfg(q_lora_rank) if att == "mla" else AttentionConfig(type="mha"),
        moe={"use_moe": use_moe, "num_experts": 4, "top_k": 2, "expert_hidden": 32},
    )
    return KimiModel(cfg).eval()


def rope(positions, dim, theta=10000.0):
    return rope_cos_sin(torch.as_tensor(positions), dim, theta)


@pytest.mark.parametrize("att,q_lora", [("mla", None), ("mla", 24), ("mha", None)])
def test_shapes_and_causality(att, q_lora):
    m = model(att, q_lora)
    idx = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = m(idx).logits
        assert logits.shape == (2, 12, 128)
        idx2 = idx.clone()
        idx2[:, 7:] = (idx2[:, 7:] + 5) % 128  # change the future
        logits2 = m(idx2).logits
    torch.testing.assert_close(logits[:, :7], logits2[:, :7], rtol=0, atol=1e-6)
    assert (logits[:, 7:] - logits2[:, 7:]).abs().max() > 1e-3


@pytest.mark.parametrize("att,q_lora", [("mla", None), ("mla", 24), ("mha", None)])
def test_cached_prefill_then_decode_matches_full_forward(att, q_lora):
    m = model(att, q_lora)
    idx = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = m(idx).logits
        cache = m.new_cache(batch_size=3, max_len=32)
        outs = [m(idx[:, :9], cache=cache, start_pos=0).logits]  # prefill (expanded path)
        outs.append(m(idx[:, 9:13], cache=cache, start_pos=9).logits)  # a chunk after the prefix
        for p in range(13, 20):  # decode (absorbed path for MLA)
            outs.append(m(idx[:, p : p + 1], cache=cache, start_pos=p).logits)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q_lora", [None, 24])
def test_absorbed_equals_expanded(q_lora):
    """Force each path on prefill chunks and decode steps: both must give the full forward's logits."""
    m = model("mla", q_lora)
    idx = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = m(idx).logits
        for absorb in (True, False):
            for a in m.attention_layers():
                a.absorb = absorb
            cache = m.new_cache(2, 16)
            outs = [m(idx[:, :6], cache=cache, start_pos=0).logits]
            outs += [m(idx[:, p : p + 1], cache=cache, start_pos=p).logits for p in range(6, 16)]
            torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)


def test_mla_cache_stores_only_latent_and_rope_key():
    m = model("mla")
    cache = m.new_cache(1, 16, dtype=torch.bfloat16)
    assert cache.bytes_per_token() == (32 + 8) * 2 * 2  # (kv_lora + rope) * layers * bf16
    assert m.kv_cache_bytes_per_token(torch.bfloat16) == cache.bytes_per_token()
    layer = cache.layers[0]
    assert set(vars(layer)) == {"c_kv_BSC", "k_rope_BSR"}
    mha = model("mha")
    assert mha.new_cache(1, 16).bytes_per_token() == 2 * D * 2 * 4
    with pytest.raises(ValueError, match="block_size"):
        m.new_cache(1, 33)


def test_cache_limits_raise():
    m = model("mla")
    cache = m.new_cache(2, 8)
    with torch.no_grad():
        with pytest.raises(ValueError, match="max_len"):
            m(torch.zeros(2, 9, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="batch"):
            m(torch.zeros(3, 2, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="block_size"):
            m(torch.zeros(1, 30, dtype=torch.long), start_pos=5)


def naive_mla_logits(a: MLA, x_BTD):
    """Per-head logits via the absorbed formulation (a different route than the module's SDPA path)."""
    B, T, _ = x_BTD.shape
    q = a.q_proj(x_BTD) if a.cfg.q_lora_rank is None else a.q_b_proj(a.q_a_layernorm(a.q_a_proj(x_BTD)))
    q = q.view(B, T, a.n_head, -1)
    q_nope, q_rope = q[..., : a.nope], q[..., a.nope :]
    kv = a.kv_a_proj_with_mqa(x_BTD)
    c_kv, k_rope = a.kv_a_layernorm(kv[..., : a.kv_lora_rank]), kv[..., a.kv_lora_rank :]
    cos, sin = rope(range(T), a.rope)
    q_rope = apply_rope(q_rope, cos, sin, a.cfg.rope_interleave)
    k_rope = apply_rope(k_rope[:, :, None], cos, sin, a.cfg.rope_interleave)[:, :, 0]
    w = a.kv_b_proj.weight.view(a.n_head, a.nope + a.v_dim, a.kv_lora_rank)[:, : a.nope]
    s = torch.einsum("bthn,hnc,bsc->bhts", q_nope, w, c_kv) + torch.einsum("bthr,bsr->bhts", q_rope, k_rope)
    return s * (a.nope + a.rope) ** -0.5


def naive_mha_logits(a: MHA, x_BTD):
    B, T, _ = x_BTD.shape
    cos, sin = rope(range(T), a.head_dim)
    q = apply_rope(a.q_proj(x_BTD).view(B, T, a.n_head, -1), cos, sin, a.cfg.rope_interleave)
    k = apply_rope(a.k_proj(x_BTD).view(B, T, a.n_head, -1), cos, sin, a.cfg.rope_interleave)
    return torch.einsum("bthd,bshd->bhts", q, k) * a.head_dim**-0.5


def causal_max(s_BHTS):
    T = s_BHTS.shape[-1]
    mask = torch.ones(T, T, dtype=torch.bool).triu(1)
    return s_BHTS.masked_fill(mask, float("-inf")).amax(dim=(0, 2, 3))


def make_attn(kind, q_lora=None, bias=False):
    torch.manual_seed(4)
    if kind == "mla":
        a = MLA(D, H, mla_cfg(q_lora))
    else:
        a = MHA(D, H, AttentionConfig(type="mha", bias=bias))
    for p in a.parameters():
        torch.nn.init.normal_(p, std=0.3)  # big weights -> logits well above 0
    return a, (naive_mla_logits if kind == "mla" else naive_mha_logits)


@pytest.mark.parametrize("kind,q_lora", [("mla", None), ("mla", 24), ("mha", None)])
def test_max_logits_match_naive_and_chunking(kind, q_lora, monkeypatch):
    a, naive = make_attn(kind, q_lora)
    x = torch.randn(2, 11, D, generator=torch.Generator().manual_seed(5))
    T = x.shape[1]
    cos, sin = rope(range(T), a.rope_dim)
    monkeypatch.setattr(attention, "_MAX_LOGIT_CHUNK_ELEMS", 2 * H * T * 3)  # chunks of 3 queries
    a.train()
    with torch.no_grad():
        a(x, cos, sin)
        ref = causal_max(naive(a, x))
    assert (ref > 0).all()
    torch.testing.assert_close(a.max_logits_H, ref, rtol=1e-5, atol=1e-5)
    # running max: a second, weaker batch does not lower it; eval forwards record nothing
    with torch.no_grad():
        a(x * 0.1, cos, sin)
        torch.testing.assert_close(a.max_logits_H, ref, rtol=1e-5, atol=1e-5)
        a.reset_max_logits()
        a.eval()
        a(x, cos, sin)
    assert (a.max_logits_H == 0).all()


def test_causal_max_logits_equal_the_masked_scaled_scores_bit_for_bit():
    """causal_max_logits takes the max over the batch before masking and scales the H maxima instead of the
    scores: the same numbers as masking the scaled (B, H, T, S) scores, to the bit, queries at S - T on.
    (In chunks of queries the products may round differently: test_max_logits_match_naive_and_chunking.)"""
    B, Hh, T, S, d, scale = 3, 4, 5, 9, 16, 0.37
    g = torch.Generator().manual_seed(7)
    q_BHTd, k_BHSd = torch.randn(B, Hh, T, d, generator=g), torch.randn(B, Hh, S, d, generator=g)
    k_BHSd[:, :, S - T + 1 :] *= 50  # future keys with big logits: only the causal mask keeps them out
    s_BHTS = (q_BHTd @ k_BHSd.transpose(-1, -2)) * scale
    future_TS = torch.arange(S)[None, :] > torch.arange(S - T, S)[:, None]
    want_H = s_BHTS.masked_fill(future_TS, float("-inf")).amax(dim=(0, 2, 3))
    assert (want_H < s_BHTS.amax(dim=(0, 2, 3))).all()  # the mask matters for every head
    assert torch.equal(attention.causal_max_logits(q_BHTd, k_BHSd, scale), want_H)


@pytest.mark.parametrize("kind,q_lora,bias", [("mla", None, False), ("mla", 24, False), ("mha", None, True)])
def test_qk_clip_scales_multiply_head_logits_by_gamma(kind, q_lora, bias):
    a, naive = make_attn(kind, q_lora, bias)
    x = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(6))
    gamma = torch.tensor([1.0, 0.5, 1.0, 0.1])
    with torch.no_grad():
        before = causal_max(naive(a, x))
        s_before = naive(a, x)
        old = {n: p.clone() for n, p in a.named_parameters()}
        scales = a.qk_clip_scales(gamma)
        for p, s in scales:
            assert s.shape == (p.shape[0],)
            p.mul_(s.view(-1, *([1] * (p.dim() - 1))))
        after = causal_max(naive(a, x))
        s_after = naive(a, x)
    torch.testing.assert_close(after, before * gamma, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_after, s_before * gamma[None, :, None, None], rtol=1e-4, atol=1e-4)
    # rows of unclipped heads are scaled by exactly 1.0, so they stay bit-identical
    named = {id(p): n for n, p in a.named_parameters()}
    for p, s in scales:
        rows = s.view(H, -1)
        assert (rows[0] == 1.0).all() and (rows[2] == 1.0).all()
        n = named[id(p)]
        assert torch.equal(p.view(H, -1)[0], old[n].view(H, -1)[0])
    if kind == "mla":
        names = {named[id(p)] for p, _ in scales}
        assert "kv_a_proj_with_mqa.weight" not in names  # the shared rope key is never touched
        kv_rows = dict((named[id(p)], s) for p, s in scales)["kv_b_proj.weight"].view(H, -1)
        assert (kv_rows[:, a.nope :] == 1.0).all()  # v rows


def test_attend_with_offset_matches_naive():
    g = torch.Generator().manual_seed(7)
    q, k, v = (
        torch.randn(1, 2, 3, 8, generator=g),
        torch.randn(1, 2, 7, 8, generator=g),
        torch.randn(1, 2, 7, 5, generator=g),
    )
    out = attention.attend(q, k, v, 0.3, start_pos=4)
    s = (q @ k.transpose(-1, -2)) * 0.3
    mask = torch.arange(7)[None, :] > torch.arange(4, 7)[:, None]
    ref = s.masked_fill(mask, float("-inf")).softmax(-1) @ v
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_attend_narrow_values_take_the_fused_kernel_and_match_naive():
    """MLA's values are narrower than its queries: attend pads them so SDPA's CPU flash kernel runs (the math
    fallback materialises the scores), and the output and all three gradients still equal the naive causal
    attention's."""
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 3, 6, 8, generator=g), torch.randn(2, 3, 6, 8, generator=g)
    v, grad = torch.randn(2, 3, 6, 5, generator=g), torch.randn(2, 3, 6, 5, generator=g)
    qa, ka, va = (t.clone().requires_grad_() for t in (q, k, v))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = attention.attend(qa, ka, va, 0.3, start_pos=0)
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in {e.key for e in prof.key_averages()}
    out.backward(grad)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    s = (qr @ kr.transpose(-1, -2)) * 0.3
    ref = s.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf")).softmax(-1) @ vr
    ref.backward(grad)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, r in ((qa, qr), (ka, kr), (va, vr)):
        torch.testing.assert_close(a.grad, r.grad, rtol=1e-5, atol=1e-6)


def test_mha_dense_baseline_structure():
    m = model("mha", use_moe=False)
    names = {n for n, _ in m.named_parameters()}
    assert "layers.0.attn.q_proj.weight" in names and "layers.0.attn.v_proj.weight" in names
    assert "layers.0.ffn.gate_proj.weight" in names and not m.moe_layers()


def rotate_pairs_reference(x, cos_TR, sin_TR, interleave, skip):
    """RoPE written out pair by pair in fp64: (a, b) -> (a cos - b sin, b cos + a sin), the first `skip`
    dims untouched, every value written back where it came from."""
    x64, out = x.double(), x.double().clone()
    R = x.shape[-1] - skip
    for p in range(R // 2):
        i, j = (skip + 2 * p, skip + 2 * p + 1) if interleave else (skip + p, skip + p + R // 2)
        c, s = cos_TR[:, None, p].double(), sin_TR[:, None, p].double()  # (T, 1) over heads
        out[..., i] = x64[..., i] * c - x64[..., j] * s
        out[..., j] = x64[..., j] * c + x64[..., i] * s
    return out


@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("skip", [0, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rope_rotates_each_pair_in_place_of_the_reference(interleave, skip, dtype):
    """fp32 with interleaved pairs takes the one-complex-multiply path; bf16, non-interleaved pairs and
    strides a complex view cannot take run the real path: all against the same pair-by-pair reference."""
    torch.manual_seed(0)
    B, T, nH, R = 2, 5, 3, 8
    cos, sin = rope(range(T), R)
    x = torch.randn(B, T, nH, skip + R, dtype=dtype)
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    want = rotate_pairs_reference(x, cos, sin, interleave, skip)
    torch.testing.assert_close(apply_rope(x, cos, sin, interleave, skip).double(), want, **tol)
    odd = torch.randn(B, T, nH, skip + R + 1, dtype=dtype)[..., 1:]  # offset 1: no complex view
    odd.copy_(x)
    # the paths this test means to cover are the ones taken
    assert layers._complex_view_ok(x, skip) == (dtype == torch.float32) and not layers._complex_view_ok(odd, skip)
    torch.testing.assert_close(apply_rope(odd, cos, sin, interleave, skip).double(), want, **tol)


def test_apply_rope_backward_matches_the_real_path():
    torch.manual_seed(0)
    cos, sin = rope(range(5), 8)
    x = torch.randn(2, 5, 3, 14, requires_grad=True)
    g = torch.randn(2, 5, 3, 14)
    (gx_complex,) = torch.autograd.grad(apply_rope(x, cos, sin, True, skip=6), x, g)
    x_odd = torch.randn(2, 5, 3, 15)[..., 1:].copy_(x.detach()).requires_grad_()  # forces the real path
    (gx_real,) = torch.autograd.grad(apply_rope(x_odd, cos, sin, True, skip=6), x_odd, g)
    torch.testing.assert_close(gx_complex, gx_real, atol=1e-6, rtol=1e-6)
