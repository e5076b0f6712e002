"""Newton-Schulz methods (quintic, Polar Express; plain and Gram iterations) against a float64 polar factor.

Reference: G = U S V^T from torch.linalg.svd in float64. An ideal method returns U f(S) V^T with f(s) near 1;
for each output O we take D = U^T O V and check (a) O = U D V^T and D is diagonal, to fp32 rounding, i.e.
O keeps G's singular vectors; (b) D's diagonal f(s) lies in the method's band for s / ||G||_F >= LOWER and in
[0, hi] below it. The bands are the scalar maps' own (composed polynomials on a dense float64 grid):

  quintic, 5 iterations          [3e-3, 1] -> [0.68, 1.21]
  polar_express, 4 iterations    [3e-3, 1] -> [0.78, 1.22]

Gram iterations give the plain loop's result to <= 5e-5 relative (fp32, up to 6 iterations) on matrices with
singular values down to 1e-5 of the largest. bf16 (the default on CUDA and native-bf16 CPUs) keeps the band,
+-0.02, for singular values >= 0.05 ||G||_F (below, bf16's rounding of the entries is as large as they are)
and never lets the top singular value run away (what Polar Express's safety factor is for).
"""

import pytest
import torch

from kimi.optim.newton_schulz import (
    GRAM_MIN_ASPECT,
    NS_COEFFS,
    PE_LOWER,
    NSSpec,
    _minimax_quintic,
    default_ns_dtype,
    newton_schulz,
    newton_schulz_flops,
    polar_express_coeffs,
    resolve_gram,
)

LOWER = 3e-3  # band checked for singular values >= LOWER * ||G||_F
BANDS = {"quintic": (5, 0.68, 1.21), "polar_express": (4, 0.78, 1.22)}  # method -> (steps, lo, hi)
FP32_TOL = 2e-4  # off-diagonal of U^T out V, and the part of out outside G's singular subspaces (fp32 rounding)


def _coeffs(method, steps):
    return polar_express_coeffs(steps) if method == "polar_express" else (NS_COEFFS,) * steps


def _scalar_map(method, steps, x):
    for a, b, c in _coeffs(method, steps):
        x = a * x + b * x**3 + c * x**5
    return x


def _ill_conditioned(b, n, m, smallest, gen):
    """b random n x m matrices with singular values log-spaced from 1 down to `smallest`."""
    k = min(n, m)
    U, _ = torch.linalg.qr(torch.randn(b, n, k, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(b, m, k, generator=gen, dtype=torch.float64))
    S = torch.logspace(0, torch.log10(torch.tensor(smallest)).item(), k, dtype=torch.float64)
    return (U * S) @ V.mT


def _matrices(n, m, seed=0):
    """Random, ill-conditioned (1e-5) and rank-1-dominated (top singular value ~1 after normalising)
    batches of 3 n x m matrices, float64."""
    g = torch.Generator().manual_seed(seed)
    kw = dict(generator=g, dtype=torch.float64)
    return {"random": torch.randn(3, n, m, **kw), "ill-conditioned": _ill_conditioned(3, n, m, 1e-5, g),
            "rank-1 + noise": 30 * torch.randn(3, n, 1, **kw) @ torch.randn(3, 1, m, **kw) + torch.randn(3, n, m, **kw)}  # fmt: skip


def _against_polar(G, out):
    """(s / ||G||_F, diag of U^T out V, max off-diagonal norm, max norm of out outside U, V's spans)."""
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    D = U.mT @ out.double() @ Vh.mT
    d = D.diagonal(dim1=-2, dim2=-1)
    off = (D - torch.diag_embed(d)).norm(dim=(-2, -1)).max().item()
    outside = (out.double() - U @ D @ Vh).norm(dim=(-2, -1)).max().item()
    return S / S.norm(dim=-1, keepdim=True), d, off, outside


def test_scalar_bands():
    """The bands in the module docstring, from the composed polynomials themselves; the headroom above 1
    that PE_SAFETY buys (inputs up to 1.01 stay in the band); the quintic's 4/5-step comparison."""
    x = torch.logspace(-6, 0, 200_001, dtype=torch.float64)
    for method, (steps, lo, hi) in BANDS.items():
        y = _scalar_map(method, steps, x)
        band = y[x >= LOWER]
        assert lo <= band.min() and band.max() <= hi, (method, band.min().item(), band.max().item())
        assert y.min() >= 0 and y.max() <= hi  # below LOWER: smaller, never negative, never above the band
    pe = _scalar_map("polar_express", 4, torch.linspace(LOWER, 1.01, 10_001, dtype=torch.float64))
    assert 0.78 <= pe.min() and pe.max() <= 1.22  # 1.02 would be 4e18: the headroom is PE_SAFETY's 1%
    q4 = _scalar_map("quintic", 4, x)[x >= LOWER]
    assert q4.min() < 0.42  # the quintic needs its 5th iteration to reach LOWER; Polar Express does it in 4


@pytest.mark.parametrize("lo, hi", [(PE_LOWER, 1.0), (0.5, 1.5), (0.95, 1.06)])
def test_minimax_quintic_equioscillates(lo, hi):
    """Each Polar Express polynomial is the best odd quintic on its interval: the error 1 - p reaches +-E at
    4 points with alternating signs (Chebyshev's equioscillation theorem), and nowhere exceeds E."""
    a, b, c, E = _minimax_quintic(lo, hi)
    x = torch.linspace(lo, hi, 400_001, dtype=torch.float64)
    err = 1 - (a * x + b * x**3 + c * x**5)
    assert 0 < E < 1 and err.abs().max() <= E * (1 + 1e-9)
    assert err[0] == pytest.approx(E, rel=1e-9) and err[-1] == pytest.approx(-E, rel=1e-9)
    assert err.min() == pytest.approx(-E, rel=1e-6) and err.max() == pytest.approx(E, rel=1e-6)
    sign = torch.sign(err[err.abs() > 0.999 * E])
    assert (sign[1:] != sign[:-1]).sum() == 3  # +E, -E, +E, -E


def test_polar_express_schedule_is_greedy_and_steeper_than_the_quintic():
    """Iteration t's polynomial does not depend on the total count, and the first one is far steeper at 0."""
    assert polar_express_coeffs(3) == polar_express_coeffs(5)[:3]
    assert polar_express_coeffs(1)[0][0] > 2 * NS_COEFFS[0]


@pytest.mark.parametrize("shape", [(48, 128), (128, 48)])
@pytest.mark.parametrize("method, gram", [("quintic", False), ("polar_express", False), ("quintic", True),
                                          ("polar_express", True)])  # fmt: skip
def test_fp32_against_float64_polar_factor(method, gram, shape):
    steps, lo, hi = BANDS[method]
    for kind, G in _matrices(*shape).items():
        out = newton_schulz(G.float(), steps, dtype=torch.float32, method=method, gram=gram)
        s, d, off, outside = _against_polar(G, out)
        assert off < FP32_TOL and outside < FP32_TOL, (kind, off, outside)
        assert lo <= d[s >= LOWER].min() and d.max() <= hi, (kind, d[s >= LOWER].min().item(), d.max().item())
        assert d.min() >= -FP32_TOL, kind


@pytest.mark.parametrize("shape", [(48, 128), (128, 48), (64, 64)])
@pytest.mark.parametrize("method", ["quintic", "polar_express"])
def test_bf16_band_and_no_runaway(method, shape):
    steps, lo, hi = BANDS[method]
    mats = _matrices(*shape)
    g = torch.Generator().manual_seed(2)  # exactly rank 1: the top singular value is exactly ||G||_F
    mats["rank-1"] = torch.randn(64, shape[0], 1, generator=g) @ torch.randn(64, 1, shape[1], generator=g)
    for kind, G in mats.items():
        out = newton_schulz(G.float(), steps, dtype=torch.bfloat16, method=method)
        s, d, _, _ = _against_polar(G.double(), out)
        assert lo - 0.02 <= d[s >= 0.05].min() and d[s >= 0.05].max() <= hi + 0.02, kind
        top = torch.linalg.matrix_norm(out.double(), 2).max()
        assert top <= hi + 0.02, (kind, top.item())


@pytest.mark.parametrize("steps", [3, 4, 5, 6])
@pytest.mark.parametrize("method", ["quintic", "polar_express"])
def test_gram_iterations_equal_the_plain_loop(method, steps):
    """Same map: <= 5e-5 relative in fp32 (measured <= 2.3e-5, ill-conditioned, restarts every 3; it grows with
    more iterations: 1.4e-4 at 8 quintic ones), on wide and tall inputs and a 4-D batch; matrices under
    GRAM_MIN_ASPECT take the plain loop, bit for bit."""
    g = torch.Generator().manual_seed(1)
    for G in (_ill_conditioned(2, 40, 120, 1e-5, g).float(), _ill_conditioned(2, 120, 40, 1e-5, g).float(),
              torch.randn(2, 3, 32, 80, generator=g)):  # fmt: skip
        plain = newton_schulz(G, steps, dtype=torch.float32, method=method)
        gram = newton_schulz(G, steps, dtype=torch.float32, method=method, gram=True)
        err = (gram - plain).norm(dim=(-2, -1)) / plain.norm(dim=(-2, -1))
        assert err.max() < 5e-5, err.max().item()
    square = torch.randn(2, 40, int(40 * GRAM_MIN_ASPECT) - 1, generator=g)
    assert torch.equal(newton_schulz(square, steps, dtype=torch.float32, method=method, gram=True),
                       newton_schulz(square, steps, dtype=torch.float32, method=method))  # fmt: skip


def test_spec_defaults_and_refusals():
    assert NSSpec().steps == 5 and NSSpec("polar_express").steps == 4 and NSSpec("polar_express", 6).steps == 6
    G = torch.randn(2, 16, 48)
    torch.testing.assert_close(NSSpec("polar_express", 4, True)(G), newton_schulz(G, 4, dtype=torch.float32,
                               method="polar_express", gram=True), rtol=0, atol=0)  # fmt: skip
    assert NSSpec(gram=True)(G.bfloat16()).dtype == torch.float32  # Gram's default dtype is fp32 everywhere
    with pytest.raises(ValueError, match="not one of 'quintic', 'polar_express'"):
        NSSpec("cubic")
    with pytest.raises(ValueError, match=">= 1 iteration"):
        NSSpec(steps=0)
    with pytest.raises(ValueError, match="Gram Newton-Schulz needs fp32"):
        newton_schulz(G, dtype=torch.bfloat16, gram=True)
    with pytest.raises(ValueError, match="gram='yes' is not one of True, False, 'auto'"):
        NSSpec(gram="yes")


def test_auto_gram_follows_the_dtype():
    """gram="auto": the Gram loop wherever the iterations run in fp32/fp64, the plain loop in bf16 (which the
    Gram loop cannot take), and "auto" never forces the dtype the way gram=True does."""
    G = torch.randn(2, 16, 48, generator=torch.Generator().manual_seed(5))
    for dt, same_as in [(torch.float32, True), (torch.float64, True), (torch.bfloat16, False)]:
        assert torch.equal(newton_schulz(G, dtype=dt, gram="auto"), newton_schulz(G, dtype=dt, gram=same_as)), dt
        assert resolve_gram("auto", dt) is same_as
    assert resolve_gram(True, torch.bfloat16) and not resolve_gram(False, torch.float32)
    assert default_ns_dtype(torch.device("cuda"), "auto") == torch.bfloat16  # auto Gram leaves CUDA in bf16
    assert default_ns_dtype(torch.device("cuda"), True) == torch.float32


@pytest.mark.parametrize("gram", [False, True])
@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (3, 16, 40), (2, 2, 24, 24)])
def test_flop_count_matches_torch_flop_counter(shape, gram):
    """newton_schulz_flops (counted on the meta device) == what torch's FlopCounterMode counts in a real run,
    for iteration counts with and without Gram restarts, wide and tall, batched and square (no Gram there);
    the plain loop's count is the closed form the docs quote, 4n^2 m + 2n^3 an iteration, and Gram's is below
    it on wide matrices."""
    from torch.utils.flop_counter import FlopCounterMode

    G = torch.randn(shape)
    n, m = sorted(shape[-2:])
    matrices = torch.Size(shape[:-2]).numel()
    for steps in (1, 3, 4, 5, 7):
        with FlopCounterMode(display=False) as counter:
            newton_schulz(G, steps, dtype=torch.float32, gram=gram)
        flops = newton_schulz_flops(shape, steps, gram)
        assert flops == counter.get_total_flops() > 0, (shape, steps, gram)
        plain = matrices * steps * (4 * n * n * m + 2 * n**3)
        if not gram or m < GRAM_MIN_ASPECT * n:
            assert flops == plain, (shape, steps)
        elif steps > 1:
            assert flops < plain, (shape, steps)
