"""Fused MoE router: scores + selection bias + group-limited top-k + weights + per-expert counts, one launch.

Legend: T tokens, E experts, K experts per token (top_k), G expert groups (n_group).

    logits_TE --score (sigmoid | softmax)--> scores_TE --+ bias_E--> choice_TE
      --[G > 1: group score = sum of its 2 best choices; keep the topk_group best groups]-->
      --K passes of max/argmax--> topk_idx_TK, weights = scores[idx] (unbiased), normalised, scaled
      --one-hot sums, one integer atomic per program--> counts_E

Tie rule (kernel and reference alike): among equal values the LOWEST index wins, for groups and experts,
and the K choices come out in descending order of choice score. NaN counts as larger than any number
(torch.sort's order), so a NaN token still picks K real experts (lowest indices first) and its NaN weights
reach the loss, where train.nonfinite sees them. All routing math is fp32.

The top-k is K passes of max + argmax rather than a sort: cheap for small K, and the Triton interpreter
(CPU tests) runs tl.sort / tl.topk orders of magnitude slower. The backward is a short torch formula
(see `_FusedRoute.backward`): the gradient reaches the logits through the K selected weights only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import interpreting, row_block


@triton.jit
def _first_max(x, cols, PAD: tl.constexpr):
    """Per row of x: the column of the largest value, lowest on ties, NaN above everything (else `x == max`
    holds nowhere on a NaN row and the id would be PAD, an expert that does not exist)."""
    nan = x != x
    has_nan = tl.max(nan.to(tl.int32), axis=1) > 0
    m = tl.max(tl.where(nan, float("-inf"), x), axis=1)
    hit = tl.where(has_nan[:, None], nan, x == m[:, None])
    return tl.min(tl.where(hit, cols[None, :], PAD), axis=1)


@triton.jit
def _route_kernel(
    logits_ptr, bias_ptr, w_ptr, idx_ptr, counts_ptr, T, E, scale,
    SIGMOID: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr,
    N_GROUP: tl.constexpr, PER_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, G_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, E_PAD: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, E_PAD)
    row_ok = rows < T
    col_ok = cols < E
    ok = row_ok[:, None] & col_ok[None, :]
    x = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * E + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    if SIGMOID:
        scores = tl.where(ok, tl.sigmoid(x), 0.0)
    else:
        x = tl.where(col_ok[None, :], x, float("-inf"))
        ex = tl.exp(x - tl.max(x, axis=1)[:, None])
        scores = ex / tl.sum(ex, axis=1)[:, None]
    choice = scores
    if HAS_BIAS:
        choice = choice + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    choice = tl.where(col_ok[None, :], choice, float("-inf"))

    if N_GROUP > 1:
        # Group score: sum of the group's two best choices (DeepSeek-V3); keep the TOPK_GROUP best groups.
        gcols = tl.arange(0, G_PAD)
        gscore = tl.full((BLOCK_T, G_PAD), float("-inf"), tl.float32)
        for g in tl.static_range(N_GROUP):
            in_g = (cols >= g * PER_GROUP) & (cols < (g + 1) * PER_GROUP)
            c = tl.where(in_g[None, :], choice, float("-inf"))
            first = _first_max(c, cols, E_PAD)
            s = tl.sum(tl.where(cols[None, :] == first[:, None], c, 0.0), axis=1)
            if PER_GROUP > 1:
                c = tl.where(cols[None, :] == first[:, None], float("-inf"), c)
                second = _first_max(c, cols, E_PAD)
                s += tl.sum(tl.where(cols[None, :] == second[:, None], c, 0.0), axis=1)
            gscore = tl.where(gcols[None, :] == g, s[:, None], gscore)
        keep = tl.zeros((BLOCK_T, G_PAD), tl.int32)
        for _ in tl.static_range(TOPK_GROUP):
            gi = _first_max(gscore, gcols, G_PAD)
            hit = gcols[None, :] == gi[:, None]
            keep = tl.where(hit, 1, keep)
            gscore = tl.where(hit, float("-inf"), gscore)
        # Expand the kept groups to their experts: col's group is col // PER_GROUP.
        keep_col = tl.zeros((BLOCK_T, E_PAD), tl.int32)
        for g in tl.static_range(N_GROUP):
            kept_g = tl.sum(tl.where(gcols[None, :] == g, keep, 0), axis=1)
            in_g = (cols >= g * PER_GROUP) & (cols < (g + 1) * PER_GROUP)
            keep_col = tl.where(in_g[None, :], kept_g[:, None], keep_col)
        choice = tl.where(keep_col > 0, choice, float("-inf"))

    kcols = tl.arange(0, K_PAD)
    w_TK = tl.zeros((BLOCK_T, K_PAD), tl.float32)
    idx_TK = tl.zeros((BLOCK_T, K_PAD), tl.int32)
    counts = tl.zeros((E_PAD,), tl.int32)
    for k in tl.static_range(K):
        i = _first_max(choice, cols, E_PAD)
        hit = cols[None, :] == i[:, None]
        w = tl.sum(tl.where(hit, scores, 0.0), axis=1)  # the UNBIASED score of the chosen expert
        w_TK = tl.where(kcols[None, :] == k, w[:, None], w_TK)
        idx_TK = tl.where(kcols[None, :] == k, i[:, None], idx_TK)
        counts += tl.sum((hit & row_ok[:, None]).to(tl.int32), axis=0)
        choice = tl.where(hit, float("-inf"), choice)
    if NORM:
        w_TK = w_TK / (tl.sum(w_TK, axis=1)[:, None] + 1e-20)
    w_TK = w_TK * scale
    out = rows.to(tl.int64)[:, None] * K + kcols[None, :]
    out_ok = row_ok[:, None] & (kcols[None, :] < K)
    tl.store(w_ptr + out, w_TK, mask=out_ok)
    tl.store(idx_ptr + out, idx_TK.to(tl.int64), mask=out_ok)
    tl.atomic_add(counts_ptr + cols, counts, mask=col_ok)  # integer adds: order-free, deterministic


def _launch(logits_TE, bias_E, top_k, score_func, n_group, topk_group, norm_topk_prob, scale, block_t):
    T, E = logits_TE.shape
    dev = logits_TE.device
    w_TK = torch.empty(T, top_k, device=dev, dtype=torch.float32)
    idx_TK = torch.empty(T, top_k, device=dev, dtype=torch.int64)
    counts_E = torch.zeros(E, device=dev, dtype=torch.int32)
    if T == 0:
        return w_TK, idx_TK, counts_E
    E_PAD = triton.next_power_of_2(E)
    BLOCK_T = block_t or row_block(T, E_PAD)
    bias = bias_E.contiguous() if bias_E is not None else w_TK  # a dummy pointer when there is no bias
    _route_kernel[(triton.cdiv(T, BLOCK_T),)](
        logits_TE.contiguous(), bias, w_TK, idx_TK, counts_E, T, E, float(scale),
        SIGMOID=score_func == "sigmoid", NORM=norm_topk_prob, HAS_BIAS=bias_E is not None,
        K=top_k, K_PAD=triton.next_power_of_2(top_k),
        N_GROUP=n_group, PER_GROUP=E // n_group, TOPK_GROUP=topk_group, G_PAD=triton.next_power_of_2(n_group),
        BLOCK_T=BLOCK_T, E_PAD=E_PAD, num_warps=4,
    )  # fmt: skip
    return w_TK, idx_TK, counts_E


class _FusedRoute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TE, bias_E, top_k, score_func, n_group, topk_group, norm, scale, block_t):
        w_TK, idx_TK, counts_E = _launch(
            logits_TE, bias_E, top_k, score_func, n_group, topk_group, norm, scale, block_t
        )
        ctx.save_for_backward(logits_TE, idx_TK)
        ctx.score_func, ctx.norm, ctx.scale, ctx.dtype = score_func, norm, scale, logits_TE.dtype
        ctx.mark_non_differentiable(idx_TK, counts_E)
        return w_TK, idx_TK, counts_E

    @staticmethod
    def backward(ctx, g_w_TK, _g_idx, _g_counts):
        # w = scale * s_sel / (sum s_sel + eps) with the selection held fixed, so only the K chosen scores
        # get a gradient: d s_j = scale/S * (g_j - sum_k g_k s_k / S). Then through sigmoid or softmax.
        logits_TE, idx_TK = ctx.saved_tensors
        g_w_TK = g_w_TK.float()
        logits_TE = logits_TE.float()
        if ctx.score_func == "sigmoid":
            s_TK = logits_TE.gather(1, idx_TK).sigmoid()
        else:
            s_TE = logits_TE.softmax(dim=-1)
            s_TK = s_TE.gather(1, idx_TK)
        if ctx.norm:
            S_T1 = s_TK.sum(dim=-1, keepdim=True) + 1e-20
            g_s_TK = ctx.scale / S_T1 * (g_w_TK - (g_w_TK * s_TK).sum(dim=-1, keepdim=True) / S_T1)
        else:
            g_s_TK = ctx.scale * g_w_TK
        if ctx.score_func == "sigmoid":
            g_TE = torch.zeros_like(logits_TE).scatter_(1, idx_TK, g_s_TK * s_TK * (1 - s_TK))
        else:
            g_s_TE = torch.zeros_like(logits_TE).scatter_(1, idx_TK, g_s_TK)
            g_TE = s_TE * (g_s_TE - (g_s_TE * s_TE).sum(dim=-1, keepdim=True))
        return g_TE.to(ctx.dtype), None, None, None, None, None, None, None, None


@torch.compiler.disable
def fused_route(
    logits_TE: torch.Tensor,
    bias_E: torch.Tensor | None,
    top_k: int,
    score_func: str = "sigmoid",
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
    block_t: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Route T tokens over E experts from router logits: (weights_TK fp32, expert_idx_TK int64, counts_E int32).

    Weights are the unbiased scores of the chosen experts (renormalised if norm_topk_prob), times
    routed_scaling_factor; gradients reach `logits_TE` through them. `block_t` (rows per program, a
    power of 2) is for tests; by default it is sized for the device or the interpreter.
    """
    if logits_TE.device.type != "cuda" and not interpreting():
        raise ValueError("kimi.kernels runs on CUDA tensors; on CPU set TRITON_INTERPRET=1 (slow: tests only)")
    args = (top_k, score_func, n_group, topk_group, norm_topk_prob, routed_scaling_factor, block_t)
    return _FusedRoute.apply(logits_TE, bias_E, *args)


def route_reference(
    logits_TE: torch.Tensor,
    bias_E: torch.Tensor | None,
    top_k: int,
    score_func: str = "sigmoid",
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain PyTorch, same contract and tie rule as `fused_route` (stable descending sorts: lowest index first)."""
    T, E = logits_TE.shape
    x_TE = logits_TE.float()
    scores_TE = x_TE.sigmoid() if score_func == "sigmoid" else x_TE.softmax(dim=-1)
    choice_TE = scores_TE.detach() if bias_E is None else scores_TE.detach() + bias_E.float()
    if n_group > 1:
        group_TG = choice_TE.view(T, n_group, -1).topk(min(2, E // n_group), dim=-1).values.sum(dim=-1)
        keep_idx = group_TG.sort(dim=-1, descending=True, stable=True).indices[:, :topk_group]
        keep_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(1, keep_idx, True)
        choice_TE = choice_TE.masked_fill(~keep_TG.repeat_interleave(E // n_group, dim=1), float("-inf"))
    idx_TK = choice_TE.sort(dim=-1, descending=True, stable=True).indices[:, :top_k]
    w_TK = scores_TE.gather(1, idx_TK)
    if norm_topk_prob:
        w_TK = w_TK / (w_TK.sum(dim=-1, keepdim=True) + 1e-20)
    counts_E = torch.zeros(E, dtype=torch.int32, device=logits_TE.device)
    counts_E.index_add_(0, idx_TK.reshape(-1), torch.ones(idx_TK.numel(), dtype=torch.int32, device=counts_E.device))
    return w_TK * routed_scaling_factor, idx_TK, counts_E
