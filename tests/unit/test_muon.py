"""Muon + AdamW against torch.optim.Muon / torch.optim.AdamW, Newton-Schulz properties, the param split."""

import pytest
import torch
from torch import nn

from kimi.config import ConfigError, OptimConfig
from kimi.optim.muon import Muon, build_optimizer, newton_schulz


def _grads(shapes, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) for s in shapes] for _ in range(steps)]


def _run(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_muon_matches_torch_muon(dtype):
    """2-D Muon updates == torch.optim.Muon(adjust_lr_fn='match_rms_adamw') over 5 steps with weight decay.
    torch's NS always runs in bf16: with ns_dtype=bf16 we run the same fused ops (measured: bit-identical);
    our CPU default, fp32 NS, differs from torch's bf16 NS by bf16 precision (measured 6.6e-4 at lr 0.02)."""
    shapes = [(32, 64), (64, 32), (48, 48)]
    torch.manual_seed(0)
    ref = [nn.Parameter(torch.randn(s)) for s in shapes]
    ours = [nn.Parameter(p.detach().clone()) for p in ref]
    start = [p.detach().clone() for p in ref]
    grads = _grads(shapes, 5)
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, ns_steps=5)
    _run(torch.optim.Muon(ref, adjust_lr_fn="match_rms_adamw", **kw), ref, grads)
    _run(Muon(ours, ns_dtype=dtype, **kw), ours, grads)
    diff = max((a - b).abs().max().item() for a, b in zip(ref, ours))
    print(f"max |ours - torch.optim.Muon| ({dtype}): {diff:.3e}")
    assert all((a - b).abs().max() > 0.01 for a, b in zip(ours, start))  # the steps did move the weights
    assert diff < (1e-6 if dtype == torch.bfloat16 else 2e-3)


@pytest.mark.parametrize("fused", [False, True])
def test_adamw_part_matches_torch_adamw(fused):
    """Against torch's per-op AdamW to 1e-7, and bit for bit against its fused kernel (which ours calls)."""
    shapes = [(16, 8), (8,), (3, 4, 5)]
    torch.manual_seed(1)
    ref = [nn.Parameter(torch.randn(s)) for s in shapes]
    ours = [nn.Parameter(p.detach().clone()) for p in ref]
    grads = _grads(shapes, 6, seed=1)
    kw = dict(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    _run(torch.optim.AdamW(ref, **({"fused": True} if fused else {"foreach": False}), **kw), ref, grads)
    _run(Muon([dict(params=ours, use_muon=False)], **kw), ours, grads)
    for a, b in zip(ref, ours):
        torch.testing.assert_close(b, a, rtol=0, atol=0 if fused else 1e-7)


def test_ns_3d_batched_equals_per_matrix_loop():
    G = torch.randn(4, 24, 40, generator=torch.Generator().manual_seed(2))
    batched = newton_schulz(G, dtype=torch.float32)
    for e in range(G.shape[0]):
        torch.testing.assert_close(batched[e], newton_schulz(G[e], dtype=torch.float32), rtol=0, atol=1e-5)
    # and the optimizer: a 3-D param steps exactly like its experts as separate 2-D params
    p3 = nn.Parameter(torch.randn(4, 24, 40))
    p2 = [nn.Parameter(p3.detach()[e].clone()) for e in range(4)]
    grads = _grads([(4, 24, 40)], 3, seed=3)
    _run(Muon([p3], lr=0.02, ns_dtype=torch.float32), [p3], grads)
    _run(Muon(p2, lr=0.02, ns_dtype=torch.float32), p2, [[g[0][e] for e in range(4)] for g in grads])
    torch.testing.assert_close(p3.detach(), torch.stack([p.detach() for p in p2]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(64, 64), (32, 96), (96, 32), (3, 16, 48)])
def test_ns_singular_values_in_quintic_band(shape):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    for dtype in (torch.float32, torch.bfloat16):
        S = torch.linalg.svdvals(newton_schulz(G, steps=5, dtype=dtype).float())
        assert S.min() > 0.6 and S.max() < 1.25, (dtype, S.min().item(), S.max().item())
    assert newton_schulz(G).shape == G.shape


def test_ns_default_dtype_bf16_only_on_cpus_with_native_bf16_and_explicit_dtypes():
    G = torch.randn(8, 16)
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert newton_schulz(G).dtype == (torch.bfloat16 if native else torch.float32)
    assert newton_schulz(G, dtype=torch.float32).dtype == torch.float32
    assert newton_schulz(G, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="needs a"):
        newton_schulz(torch.randn(5))


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(32, 16)
        self.attn = nn.Linear(16, 16, bias=True)
        self.router = nn.Linear(16, 4, bias=False)
        self.experts_w1 = nn.Parameter(torch.randn(4, 8, 16))
        self.norm = nn.LayerNorm(16)
        self.lm_head = nn.Linear(16, 32, bias=False)
        self.frozen = nn.Parameter(torch.randn(4, 4), requires_grad=False)


def test_build_optimizer_split():
    m = _Tiny()
    opt = build_optimizer(m, OptimConfig())
    names = {g["name"]: set(g["param_names"]) for g in opt.param_groups}
    assert names["muon"] == {"attn.weight", "experts_w1"}
    assert names["adamw"] == {"embed_tokens.weight", "router.weight", "lm_head.weight"}
    assert names["adamw_no_decay"] == {"attn.bias", "norm.weight", "norm.bias"}
    wd = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert wd == {"muon": 0.1, "adamw": 0.1, "adamw_no_decay": 0.0}
    opt_a = build_optimizer(m, OptimConfig(name="adamw"))
    assert not any(g["use_muon"] for g in opt_a.param_groups)
    assert sum(len(g["params"]) for g in opt_a.param_groups) == 8
    # one step runs on every group, and the state dict round-trips
    for p in m.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    opt.step()
    opt2 = build_optimizer(m, OptimConfig())
    opt2.load_state_dict(opt.state_dict())


def test_partition_check_names_offenders():
    from kimi.optim.muon import _check_partition

    named = dict(_Tiny().named_parameters())
    groups = [dict(params=[p for n, p in named.items() if n != "norm.bias"]), dict(params=[named["attn.weight"]])]
    with pytest.raises(ConfigError, match=r"attn.weight \(in 2 groups\).*norm.bias \(in 0 groups\)"):
        _check_partition(list(named.items()), groups)


def test_muon_rejects_1d_in_muon_group():
    with pytest.raises(ValueError, match="AdamW group"):
        Muon([nn.Parameter(torch.randn(4))])


def test_update_chunks_cut_by_size_in_shape_order_and_chunked_steps_are_identical():
    from kimi.optim.muon import update_chunks

    shapes = [(8, 8), (4, 16), (8, 8), (2, 8, 8), (4, 16), (30, 30)]
    params = [nn.Parameter(torch.randn(s)) for s in shapes]
    chunks = update_chunks(params, limit=130)
    assert [[tuple(p.shape) for p in c] for c in chunks] == [
        [(2, 8, 8)], [(4, 16), (4, 16)], [(8, 8), (8, 8)], [(30, 30)]]  # fmt: skip
    assert sum(len(c) for c in chunks) == len(params)
    # One chunk per parameter steps like one chunk for all (fp32 Newton-Schulz; batched vs single matmuls
    # round differently, as in test_ns_3d_batched_equals_per_matrix_loop).
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    grads = _grads(shapes, 3, seed=7)
    _run(Muon(params, lr=0.02, ns_dtype=torch.float32), params, grads)
    _run(Muon(twins, lr=0.02, ns_dtype=torch.float32, chunk_numel=1), twins, grads)
    for a, b in zip(params, twins):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_optim_ns_dtype_reaches_the_optimizer():
    from kimi.config import ConfigError, OptimConfig

    model = nn.Linear(8, 8, bias=False)
    assert build_optimizer(model, OptimConfig(ns_dtype="fp32")).ns_dtype == torch.float32
    assert build_optimizer(model, OptimConfig(ns_dtype="bf16")).ns_dtype == torch.bfloat16
    assert build_optimizer(model, OptimConfig()).ns_dtype is None  # auto: newton_schulz.default_ns_dtype decides
    with pytest.raises(ConfigError, match="optim.ns_dtype='fp16' is not one of"):
        build_optimizer(model, OptimConfig(ns_dtype="fp16"))


def test_optim_ns_method_reaches_the_optimizer_and_is_not_a_param_group_option():
    """optim.ns_method / ns_steps / ns_gram become the optimizer's NSSpec, and its step uses it (the update is
    the one the spec's Newton-Schulz gives); they are the optimizer's, not its groups', so a state dict from
    before them (ns_steps in each group) loads, and the config's choice survives the load."""
    from kimi.optim.newton_schulz import NSSpec

    model = nn.Linear(16, 8, bias=False)
    assert build_optimizer(model, OptimConfig()).ns == NSSpec("quintic", 5, "auto")
    opt = build_optimizer(model, OptimConfig(ns_method="polar_express", ns_gram=True, ns_dtype="fp32"))
    assert opt.ns == NSSpec("polar_express", 4, True)
    assert build_optimizer(model, OptimConfig(ns_method="polar_express", ns_steps=3)).ns.steps == 3
    old = opt.state_dict()
    for g in old["param_groups"]:
        g["ns_steps"] = 5
    opt.load_state_dict(old)
    assert opt.ns == NSSpec("polar_express", 4, True)
    w0, g = model.weight.detach().clone(), torch.randn(8, 16, generator=torch.Generator().manual_seed(8))
    model.weight.grad = g.clone()
    opt.step()
    lr, wd, mom = 3e-3, 0.1, 0.95  # OptimConfig's defaults; first step: buf = (1 - mom) g, Nesterov g + mom (buf - g)
    ns = newton_schulz(g + mom * ((1 - mom) * g - g), 4, dtype=torch.float32, method="polar_express", gram=True)
    torch.testing.assert_close(model.weight.detach(), w0 * (1 - lr * wd) - lr * 0.2 * 16**0.5 * ns, rtol=0, atol=1e-7)
    for bad, msg in [(dict(ns_method="cubic"), "optim.ns_method='cubic' is not one of"),
                     (dict(ns_steps=0), "optim.ns_steps=0 must be >= 1"),
                     (dict(ns_gram=True, ns_dtype="bf16"), "optim.ns_gram=true needs optim.ns_dtype=fp32"),
                     (dict(ns_gram="on"), "optim.ns_gram='on' is not one of true, false, 'auto'")]:  # fmt: skip
        with pytest.raises(ConfigError, match=msg):
            build_optimizer(model, OptimConfig(**bad))


@pytest.mark.parametrize("ns", [dict(ns_gram=False), dict(ns_method="polar_express", ns_gram=True), {},
                                dict(ns_dtype=torch.bfloat16)])  # fmt: skip
def test_newton_schulz_flops_is_what_a_step_multiplies(ns):
    """Muon.newton_schulz_flops() == the matmul FLOPs torch's FlopCounterMode counts in one step (the AdamW
    part multiplies nothing), stacked experts and chunking included; "auto" Gram counted as it runs: the Gram
    loop in fp32 ({}), the plain one in bf16."""
    from torch.utils.flop_counter import FlopCounterMode

    gen = torch.Generator().manual_seed(3)
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in [(16, 40), (40, 16), (4, 24, 56), (12, 12)]]
    extra = nn.Parameter(torch.randn(30, 8, generator=gen))
    opt = Muon([dict(params=params), dict(params=[extra], use_muon=False)], chunk_numel=2048,
               **{"ns_dtype": torch.float32, **ns})  # fmt: skip
    for p in [*params, extra]:
        p.grad = torch.randn(p.shape, generator=gen)
    with FlopCounterMode(display=False) as counter:
        opt.step()
    assert opt.newton_schulz_flops(torch.device("cpu")) == counter.get_total_flops() > 0
