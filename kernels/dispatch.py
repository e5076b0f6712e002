"""Permute tokens to expert-major order and back: align, gather rows, un-permute with the weighted K-sum.

Legend: T tokens, D model dim, E experts, K experts per token, N = T*K assignments, P permuted rows
(N, or N + E*(align-1) with padding: a static bound, so no host sync sizes anything).

    topk_idx_TK --count (per block of assignments)--> --cumsum (torch, (blocks, E) ints)--> --place-->
        Plan(sort_idx_P: the assignment n = t*K + k at each permuted row, N marks padding,
             pos_N: the permuted row of each assignment), counts_E (rows per expert, padding included)
    x_TD --gather_rows--> x_PD       one launch; padding rows are written as zeros
    y_PD --unpermute---> y_TD fp32   one launch: y_TD[t] = sum_k w_TK[t, k] * y_PD[pos_N[t*K + k]]

Order within an expert is by assignment index (a stable sort: what torch.argsort(stable=True) gives), so
with align=1 `sort_idx_P` equals the model's torch permutation exactly. unpermute reads only the rows
named by pos_N: padding rows (whatever a grouped GEMM left in them, NaN included) never reach the
output. Both backwards are the other kernel: gather's is an unweighted un-permute (a gather-sum, no
atomics), unpermute's is a gather scaled by the weights, plus a (T, K) dot product for the weights.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .utils import interpreting, row_block


class Plan(NamedTuple):
    sort_idx_P: torch.Tensor  # (P,) int64: assignment at each permuted row; N = padding
    pos_N: torch.Tensor  # (N,) int64: permuted row of each assignment


@triton.jit
def _count_kernel(idx_ptr, block_counts_ptr, N, E, BLOCK_N: tl.constexpr, E_PAD: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, E_PAD)
    e = tl.load(idx_ptr + rows, mask=rows < N, other=E_PAD)  # E_PAD matches no column
    hits = (e[:, None] == cols[None, :]).to(tl.int32)
    tl.store(block_counts_ptr + tl.program_id(0) * E + cols, tl.sum(hits, axis=0), mask=cols < E)


@triton.jit
def _place_kernel(idx_ptr, base_ptr, sort_ptr, pos_ptr, N, E, BLOCK_N: tl.constexpr, E_PAD: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, E_PAD)
    ok = rows < N
    e = tl.load(idx_ptr + rows, mask=ok, other=E_PAD)
    hits = (e[:, None] == cols[None, :]).to(tl.int32)
    # rank among this block's earlier assignments to the same expert; base = rows before this block
    rank = tl.sum(hits * (tl.cumsum(hits, axis=0) - 1), axis=1)
    base = tl.load(base_ptr + tl.program_id(0) * E + e, mask=ok, other=0)
    pos = base + rank
    tl.store(pos_ptr + rows, pos, mask=ok)
    tl.store(sort_ptr + pos, rows.to(tl.int64), mask=ok)


@triton.jit
def _gather_kernel(
    src_ptr, sort_ptr, scale_ptr, dst_ptr, P, N, D, K,
    HAS_SCALE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """dst[p] = scale[n] * src[n // K] with n = sort[p]; zero where n == N (padding)."""
    rows = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok, col_ok = rows < P, cols < D
    n = tl.load(sort_ptr + rows, mask=row_ok, other=N)
    real = n < N
    x = tl.load(src_ptr + (n // K)[:, None] * D + cols[None, :], mask=real[:, None] & col_ok[None, :], other=0.0)
    if HAS_SCALE:
        x = x.to(tl.float32) * tl.load(scale_ptr + n, mask=real, other=0.0).to(tl.float32)[:, None]
    dst = dst_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(dst, x.to(dst_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _combine_kernel(
    src_ptr, pos_ptr, w_ptr, dst_ptr, T, D,
    K: tl.constexpr, HAS_W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """dst[t] = sum_k w[t, k] * src[pos[t*K + k]] in fp32 (w = 1 without HAS_W)."""
    rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok, col_ok = rows < T, cols < D
    ok = row_ok[:, None] & col_ok[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
    for k in tl.static_range(K):
        p = tl.load(pos_ptr + rows * K + k, mask=row_ok, other=0)
        y = tl.load(src_ptr + p[:, None] * D + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        if HAS_W:
            y = y * tl.load(w_ptr + rows * K + k, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        acc += y
    tl.store(dst_ptr + rows[:, None] * D + cols[None, :], acc, mask=ok)


def _tile(rows: int, D: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(D) if interpreting() else min(triton.next_power_of_2(D), 256)
    return row_block(rows, block_d), block_d


def _gather(src_TD, sort_idx_P, scale_N, N, top_k, dtype):
    P, D = sort_idx_P.shape[0], src_TD.shape[1]
    dst_PD = torch.empty(P, D, device=src_TD.device, dtype=dtype)
    if P and D:
        bp, bd = _tile(P, D)
        scale = scale_N if scale_N is not None else sort_idx_P
        grid = (triton.cdiv(P, bp), triton.cdiv(D, bd))
        _gather_kernel[grid](
            src_TD.contiguous(), sort_idx_P, scale, dst_PD, P, N, D, top_k, scale_N is not None, bp, bd
        )
    return dst_PD


def _combine(src_PD, pos_N, w_TK, T, top_k):
    D = src_PD.shape[1]
    dst_TD = torch.empty(T, D, device=src_PD.device, dtype=torch.float32)
    if T and D:
        bt, bd = _tile(T, D)
        w = w_TK.contiguous() if w_TK is not None else pos_N
        grid = (triton.cdiv(T, bt), triton.cdiv(D, bd))
        _combine_kernel[grid](src_PD.contiguous(), pos_N, w, dst_TD, T, D, top_k, w_TK is not None, bt, bd)
    return dst_TD


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, sort_idx_P, pos_N, top_k):
        ctx.save_for_backward(pos_N)
        ctx.shape = (x_TD.shape[0], top_k, x_TD.dtype)
        return _gather(x_TD, sort_idx_P, None, pos_N.shape[0], top_k, x_TD.dtype)

    @staticmethod
    def backward(ctx, g_PD):
        (pos_N,) = ctx.saved_tensors
        T, K, dtype = ctx.shape
        return _combine(g_PD, pos_N, None, T, K).to(dtype), None, None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_PD, sort_idx_P, pos_N, w_TK):
        ctx.save_for_backward(y_PD, sort_idx_P, pos_N, w_TK)
        return _combine(y_PD, pos_N, w_TK, w_TK.shape[0], w_TK.shape[1])

    @staticmethod
    def backward(ctx, g_TD):
        y_PD, sort_idx_P, pos_N, w_TK = ctx.saved_tensors
        (T, K), g_TD = w_TK.shape, g_TD.contiguous()
        g_y = g_w = None
        if ctx.needs_input_grad[0]:
            g_y = _gather(g_TD, sort_idx_P, w_TK.reshape(-1).contiguous(), T * K, K, y_PD.dtype)
        if ctx.needs_input_grad[3]:
            y_TKD = y_PD.index_select(0, pos_N).view(T, K, y_PD.shape[1]).float()
            g_w = (y_TKD * g_TD.float()[:, None, :]).sum(dim=-1).to(w_TK.dtype)
        return g_y, None, None, g_w


def _check_device(t: torch.Tensor) -> None:
    if t.device.type != "cuda" and not interpreting():
        raise ValueError("kimi.kernels runs on CUDA tensors; on CPU set TRITON_INTERPRET=1 (slow: tests only)")


@torch.compiler.disable
def permute(topk_idx_TK: torch.Tensor, num_experts: int, align: int = 1) -> tuple[Plan, torch.Tensor]:
    """Expert-major order of the N = T*K assignments: (Plan, counts_E int64), each expert's rows padded
    to a multiple of `align` (vLLM's moe_align_block_size idea, for grouped GEMMs that want it)."""
    _check_device(topk_idx_TK)
    flat_N = topk_idx_TK.reshape(-1).contiguous()
    N, E, dev = flat_N.shape[0], num_experts, flat_N.device
    E_PAD = triton.next_power_of_2(E)
    block = row_block(N, E_PAD)
    nb = triton.cdiv(N, block)
    block_counts_BE = torch.empty(nb, E, device=dev, dtype=torch.int64)
    if nb:
        _count_kernel[(nb,)](flat_N, block_counts_BE, N, E, block, E_PAD)
    counts_E = block_counts_BE.sum(dim=0)
    if align > 1:
        counts_E = (counts_E + align - 1) // align * align
    base_BE = (counts_E.cumsum(0) - counts_E) + (block_counts_BE.cumsum(0) - block_counts_BE)
    P = N if align == 1 else N + E * (align - 1)
    sort_idx_P = torch.full((P,), N, device=dev, dtype=torch.int64)
    pos_N = torch.empty(N, device=dev, dtype=torch.int64)
    if nb:
        _place_kernel[(nb,)](flat_N, base_BE, sort_idx_P, pos_N, N, E, block, E_PAD)
    return Plan(sort_idx_P, pos_N), counts_E


@torch.compiler.disable
def gather_rows(x_TD: torch.Tensor, plan: Plan, top_k: int) -> torch.Tensor:
    """x_PD: each token's row once per chosen expert, in the plan's order; padding rows are zeros."""
    _check_device(x_TD)
    return _GatherRows.apply(x_TD, plan.sort_idx_P, plan.pos_N, top_k)


@torch.compiler.disable
def unpermute(y_PD: torch.Tensor, plan: Plan, topk_w_TK: torch.Tensor) -> torch.Tensor:
    """y_TD (fp32) = sum over k of topk_w_TK[t, k] * (the row of assignment t*K + k); padding rows unread."""
    _check_device(y_PD)
    return _Unpermute.apply(y_PD, plan.sort_idx_P, plan.pos_N, topk_w_TK)


# ----------------------------------------------------------------------------- references


def permute_reference(topk_idx_TK: torch.Tensor, num_experts: int, align: int = 1) -> tuple[Plan, torch.Tensor]:
    flat_N = topk_idx_TK.reshape(-1)
    N, dev = flat_N.shape[0], flat_N.device
    sort_N = torch.argsort(flat_N, stable=True)
    real_E = torch.zeros(num_experts, dtype=torch.int64, device=dev).index_add_(0, flat_N, torch.ones_like(flat_N))
    counts_E = (real_E + align - 1) // align * align
    e_N = flat_N[sort_N]  # expert of each sorted row
    rank_N = torch.arange(N, device=dev) - (real_E.cumsum(0) - real_E)[e_N]
    pos_N = torch.empty_like(sort_N).index_copy_(0, sort_N, (counts_E.cumsum(0) - counts_E)[e_N] + rank_N)
    P = N if align == 1 else N + num_experts * (align - 1)
    sort_idx_P = torch.full((P,), N, dtype=torch.int64, device=dev).index_copy_(0, pos_N, torch.arange(N, device=dev))
    return Plan(sort_idx_P, pos_N), counts_E


def gather_rows_reference(x_TD: torch.Tensor, plan: Plan, top_k: int) -> torch.Tensor:
    x_pad = torch.cat([x_TD, x_TD.new_zeros(1, x_TD.shape[1])])  # row T: the zero row padding reads
    N = plan.pos_N.shape[0]
    return x_pad.index_select(0, torch.where(plan.sort_idx_P < N, plan.sort_idx_P // top_k, x_TD.shape[0]))


def unpermute_reference(y_PD: torch.Tensor, plan: Plan, topk_w_TK: torch.Tensor) -> torch.Tensor:
    T, K = topk_w_TK.shape
    y_TKD = y_PD.index_select(0, plan.pos_N).view(T, K, y_PD.shape[1]).float()
    return (y_TKD * topk_w_TK[..., None].float()).sum(dim=1)
