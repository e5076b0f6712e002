"""Newton-Schulz orthogonalisation: the pure functions Muon is built on (Keller Jordan's layout).

Each iteration maps X = U S V^T to p(X) = U p(S) V^T for an odd quintic p(x) = ax + bx^3 + cx^5, evaluated
with matmuls as (aI + bXX^T + c(XX^T)^2) X. Two schedules of polynomials (`NSSpec.method`):

  quintic        Keller Jordan's (3.4445, -4.7750, 2.0315) every iteration: steep at 0, so 5 iterations
                 take singular values in [1e-3, 1] (after the Frobenius normalisation) to ~[0.68, 1.2]
                 (3e-3 and up; 1e-3 lands at 0.47).
  polar_express  a different polynomial per iteration, each the minimax approximation of 1 on the interval
                 the previous ones left (Amsel, Persson, Musco, Gower 2025, "The Polar Express"), derived by
                 `polar_express_coeffs` below. 4 iterations: [3e-3, 1] -> [0.78, 1.22], at least as tight
                 as the quintic's 5 there, for 4/5 of the matmuls.

and two ways to evaluate them (`NSSpec.gram`): on X itself, or on the small Gram matrix R = X X^T of a
wide X (n x m, m >= 1.5 n), accumulating the polynomial Q = h_k(R_k)...h_1(R_1) and applying it once:
X_k = Q X. Imported by `muon.py`, `dist_muon.py` and `zero_muon.py`; imports neither (only the config's
table of default iteration counts).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from kimi.config.sections import NS_DEFAULT_STEPS

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic: maximal slope at 0, singular values land in ~[0.7, 1.2]
# Polar Express: the schedule is optimal for singular values (over the Frobenius norm) in [PE_LOWER, 1];
# smaller ones still grow, by the product of the slopes at 0 (~8 x 4 x 4 x 3.4), but land below the band.
# 3e-3: at 4 iterations the band on [3e-3, 1] is [0.78, 1.22]; with 1e-3 (the paper's) it is [0.43, 1.57].
PE_LOWER = 3e-3
# Each polynomial is fitted on [l, PE_SAFETY * u] for inputs in [l, u]: rounding pushes the top singular value
# a little above its bound, and just above it a quintic fitted to end there climbs steeply (bf16, a rank-1-
# dominated matrix: top singular value 11 after 4 iterations without it, 1.18 with it). The paper: p(x/1.01).
PE_SAFETY = 1.01
GRAM_MIN_ASPECT = 1.5  # Gram iterations save matmul FLOPs only when m > 1.5 n (see `_gram_iterations`)
GRAM_RESTART = 3  # recompute X and R = X X^T from the accumulated polynomial every 3 iterations (fp32 drift)


@dataclass(frozen=True)
class NSSpec:
    """Which Newton-Schulz Muon runs: the polynomial schedule, its iteration count (None: the method's
    default, NS_DEFAULT_STEPS in the config), and whether wide matrices iterate on their Gram matrix: True
    (fp32 only), False, or "auto" (wherever the iterations run in fp32: `resolve_gram`)."""

    method: str = "quintic"
    steps: int | None = None
    gram: bool | str = False

    def __post_init__(self) -> None:
        if self.method not in NS_DEFAULT_STEPS:
            raise ValueError(
                f"Newton-Schulz method {self.method!r} is not one of {', '.join(map(repr, NS_DEFAULT_STEPS))}"
            )
        if self.steps is None:
            object.__setattr__(self, "steps", NS_DEFAULT_STEPS[self.method])
        if self.steps < 1:
            raise ValueError(f"Newton-Schulz needs >= 1 iteration, got {self.steps}")
        if self.gram not in (True, False, "auto"):
            raise ValueError(f"Newton-Schulz gram={self.gram!r} is not one of True, False, 'auto'")

    def __call__(self, G: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        return newton_schulz(G, self.steps, dtype=dtype, method=self.method, gram=self.gram)


def resolve_gram(gram: bool | str, dtype: torch.dtype) -> bool:
    """Whether Newton-Schulz in `dtype` iterates on the Gram matrix: `gram` itself, or for "auto" whenever
    it runs in fp32/fp64 (the Gram loop needs them; bf16 runs the plain one). On this project's AVX2 EPYC,
    fp32: the same map (singular values equal to 3 decimals) in 0.80x the time (docs/benchmarking.md)."""
    if gram == "auto":
        return dtype in (torch.float32, torch.float64)
    return bool(gram)


def default_ns_dtype(device: torch.device, gram: bool | str = False) -> torch.dtype:
    """bf16 where bf16 matmuls are native: CUDA, and CPUs with AVX512-BF16/AMX (measured on an AVX512-BF16
    EPYC: 198 vs 79 GFLOP/s at 1024^3, Newton-Schulz 2.2x faster); fp32 on other CPUs, which emulate it (this
    project's AVX2-only EPYC VM since 2026-12-03: 0.8 GFLOP/s bf16 vs 30 fp32, one thread). fp32 for Gram
    iterations, which need it ("auto" Gram follows the dtype, not the other way round)."""
    if gram is True:
        return torch.float32
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else torch.float32


@functools.cache
def cpu_has_native_bf16() -> bool:
    """oneDNN's own test for bf16 instructions (AVX512-BF16 or AMX) on this CPU."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def newton_schulz(G: Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype | None = None,
                  method: str = "quintic", gram: bool | str = False) -> Tensor:  # fmt: skip
    """Approximately orthogonalise each matrix in G (..., A, B): U S V^T -> U S' V^T, S' in the band of
    `method` (module docstring) for singular values above its lower end.

    Normalises each matrix by its Frobenius norm (so the spectral norm is <= 1), then runs `steps` iterations
    X <- aX + (bXX^T + c(XX^T)^2)X on the wide orientation (transposed when A > B, so the Gram matrix is the
    small one); with `gram`, matrices at least GRAM_MIN_ASPECT times wider than tall iterate on X X^T instead
    (same map, fewer FLOPs; fp32 or fp64 only; "auto": whenever the dtype is one). Leading dims are a batch.
    Computes and returns in `dtype` (default: `default_ns_dtype(G.device, gram)`).
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a (..., A, B) tensor, got shape {tuple(G.shape)}")
    coeffs = polar_express_coeffs(steps) if method == "polar_express" else (NS_COEFFS,) * steps
    X = G.to(dtype or default_ns_dtype(G.device, gram))
    gram = resolve_gram(gram, X.dtype)
    if gram and X.dtype not in (torch.float32, torch.float64):
        # bf16 Gram iterations drift off the polar factor on ill-conditioned matrices, restarts or not
        # (measured: top singular value 12.6 without, 1.30 with a restart, against 1.20 for the plain loop).
        raise ValueError(f"Gram Newton-Schulz needs fp32 or fp64, got {X.dtype}")
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.mT
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    # Fused multiply-adds (one rounding per product in bf16; the same ops as torch.optim.Muon for 2-D).
    mm_add = torch.addmm if X.ndim == 2 else torch.baddbmm
    batch = X.shape[:-2]
    X = X.flatten(0, -3) if X.ndim > 3 else X  # flatten, not reshape(-1, ..): empty expert shards (0, A, B)
    if gram and X.size(-1) >= GRAM_MIN_ASPECT * X.size(-2):
        X = _gram_iterations(X, coeffs, mm_add)
    else:
        for a, b, c in coeffs:
            A = X @ X.mT
            B = mm_add(A, A, A, beta=b, alpha=c)  # bA + cA^2
            X = mm_add(X, B, X, beta=a)  # aX + BX
    X = X.unflatten(0, batch) if len(batch) > 1 else X
    return X.mT if transposed else X


def _gram_iterations(X: Tensor, coeffs: tuple, mm_add) -> Tensor:
    """The plain loop's result for a wide X (n x m), with n x n matmuls: X_{k+1} = H_k X_k where H_k =
    aI + bR_k + cR_k^2 is a polynomial in R_k = X_k X_k^T, so R_{k+1} = H_k R_k H_k and X_k = (H_k...H_1) X_1.
    Matmul FLOPs (units of n^3, r = m/n), k iterations: plain k(2r + 1); here ~4k + 2r (R, the final Q X)
    plus 2r per restart, so it pays when r > 1.5 (byte.yaml's experts: r = 2.8). R_k, carried by products,
    drifts from the true X_k X_k^T; restarting every GRAM_RESTART iterations bounds the fp32 error against
    the plain loop (tests/unit/test_newton_schulz.py)."""
    R = X @ X.mT  # (.., n, n)
    Q = None
    for i, (a, b, c) in enumerate(coeffs):
        if i and i % GRAM_RESTART == 0:  # restart: X_i = Q X, its Gram matrix afresh
            X, Q = Q @ X, None
            R = X @ X.mT
        H = mm_add(R, R, R, beta=b, alpha=c)  # bR + cR^2
        H.diagonal(dim1=-2, dim2=-1).add_(a)  # aI + bR + cR^2
        Q = H if Q is None else H @ Q
        if i + 1 < len(coeffs) and (i + 1) % GRAM_RESTART:  # the next iteration needs R_{i+1}
            R = H @ R @ H
    return Q @ X


def newton_schulz_flops(shape: tuple[int, ...], steps: int, gram: bool = False) -> int:
    """Matmul FLOPs of `newton_schulz(G, steps, gram=gram)` on a G of `shape` (..., A, B): torch's flop counter
    on a meta-device run of the code itself, so the count cannot drift from it. The plain loop costs 4n^2 m +
    2n^3 an iteration (n = min(A, B), m = max(A, B)); the method changes coefficients, not FLOPs. Muon pays
    this every step for every hidden matrix, routed experts included, however few tokens reached them, so at
    a small batch it rivals the model's own FLOPs (kimi.bench throughput reports it); MFU does not count it."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        newton_schulz(torch.empty(shape, device="meta"), steps, dtype=torch.float32, gram=gram)
    return counter.get_total_flops()


@functools.cache
def polar_express_coeffs(steps: int, lower: float = PE_LOWER, safety: float = PE_SAFETY) -> tuple:
    """`steps` quintics (a, b, c), greedy as in the paper: iteration t gets the odd quintic closest to 1 in
    max norm on [l_t, safety * u_t] (Remez, `_minimax_quintic`), which maps that interval onto [1 - E_t,
    1 + E_t] (equioscillation), the next interval. Starts at [lower, 1]. The first k polynomials do not
    depend on `steps`. Float64; tests check the composed map against its bounds. The paper also "cushions"
    tiny lower bounds (fits on [max(l, u / 41.5), u]); at PE_LOWER it moved the 4-step band by 0.01 and
    changed nothing in bf16 here, so it is left out."""
    lo, hi, out = lower, 1.0, []
    for _ in range(steps):
        a, b, c, err = _minimax_quintic(lo, safety * hi)
        out.append((a, b, c))
        lo, hi = 1 - err, 1 + err
    return tuple(out)


def _minimax_quintic(lo: float, hi: float) -> tuple[float, float, float, float]:
    """(a, b, c, E): p(x) = ax + bx^3 + cx^5 minimising max |1 - p| on [lo, hi] (0 < lo < hi), E that max.
    Remez exchange: the optimum equioscillates at lo, its interior maximum q, interior minimum r and hi
    (p = 1 - E, 1 + E, 1 - E, 1 + E); solve that 4x4 system for (a, b, c, E), move q and r to the critical
    points of the new p (roots of a + 3bx^2 + 5cx^4), repeat until E settles."""
    q, r = (3 * lo + hi) / 4, (lo + 3 * hi) / 4
    err = None
    for _ in range(100):
        pts = torch.tensor([lo, q, r, hi], dtype=torch.float64)
        sign = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
        M = torch.stack([pts, pts**3, pts**5, sign], dim=1)
        a, b, c, e = torch.linalg.solve(M, torch.ones(4, dtype=torch.float64)).tolist()
        disc = (9 * b * b - 20 * a * c) ** 0.5
        q, r = sorted(((-3 * b + s * disc) / (10 * c)) ** 0.5 for s in (-1, 1))
        if err is not None and abs(e - err) < 1e-15:
            break
        err = e
    return a, b, c, e
