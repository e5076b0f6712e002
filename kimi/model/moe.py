"""Mixture of experts: router -> top-k -> permute -> grouped SwiGLU experts -> un-permute, weight, sum.

Legend: B batch, L sequence length, T tokens (B*L), D model dim, F expert hidden, E experts
(E_local when expert parallelism gave this module a slice), K experts per token, N = T*K routed rows.

Each step is a small module-level function so a kernel (or an expert-parallel all-to-all) can replace
it. The seam is `MoE.dispatcher`: any callable `dispatcher(x_TD, topk_idx_TK, topk_w_TK, experts) -> y_TD`
returning the routed output already weighted by topk_w and summed over K. `LocalDispatcher` is the
single-device one; kimi.parallel swaps in its all-to-all version from outside.

`moe.kernels` picks the routing and permute path: the torch functions here, or the fused Triton kernels
of kimi.kernels (same contracts; see kimi/model/kernel_choice.py). The torch path is the reference the kernels are
tested against; its numerics are what the golden losses pin.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kimi.config import MoEConfig
from kimi.model.elementwise import ELEMENTWISE, Elementwise, weight_rows
from kimi.model.kernel_choice import kernel_module
from kimi.model.layers import MLP, FP32Buffers, fp32_region
from kimi.model.recompute import MATMULS, recompute, recomputing
from kimi.model.router import (
    Router,
    capacity_keep,
    expert_counts,
    route,
    router_entropy,
    seq_aux_loss,
    switch_aux_loss,
)

# ----------------------------------------------------------------------------- dispatch steps


def permute(topk_idx_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Order the N = T*K assignments by expert: (sort_idx_N, counts_E).

    sort_idx_N[j] is the flattened (token, k) index of the j-th row in expert order; the sort is
    stable, so within an expert rows keep token order (deterministic, and what capacity relies on).
    """
    flat_N = topk_idx_TK.reshape(-1)
    return torch.argsort(flat_N, stable=True), expert_counts(flat_N, num_experts)


def gather_rows(x_TD: torch.Tensor, sort_idx_N: torch.Tensor, top_k: int) -> torch.Tensor:
    """x_ND: each token's row repeated once per chosen expert, in expert order."""
    return x_TD.index_select(0, sort_idx_N // top_k)


def scatter_rows(y_ND: torch.Tensor, idx_N: torch.Tensor) -> torch.Tensor:
    """out_ND[idx_N[n]] = y_ND[n] for a permutation idx_N: undoes `index_select(0, idx_N)`.

    index_put rather than index_copy: both backwards are a gather (deterministic on GPU, no atomics), but
    index_copy's autograd also keeps `source` (to read its shape), a second N x D copy of the expert
    outputs alive until backward; index_put's keeps only the index. In place into a fresh tensor: the
    out-of-place index_put clones its (uninitialised) input first, an N x D copy for nothing.
    """
    return y_ND.new_empty(y_ND.shape).index_put_((idx_N,), y_ND)


def unpermute(y_ND: torch.Tensor, sort_idx_N: torch.Tensor, topk_w_TK: torch.Tensor) -> torch.Tensor:
    """Put expert outputs back in (token, k) order, weight by topk_w and sum over k -> y_TD (fp32).

    A scatter + a sum over K instead of index_add: its backward is a gather, so it stays deterministic
    on GPU (no atomics). Weighting in fp32 as HF does, so bf16 outputs are not rounded twice.
    """
    T, K = topk_w_TK.shape
    y_TKD = scatter_rows(y_ND, sort_idx_N).view(T, K, -1)
    return (y_TKD.float() * topk_w_TK[..., None].float()).sum(dim=1)


def combine(y_ND: torch.Tensor, sort_idx_N: torch.Tensor, top_k: int) -> torch.Tensor:
    """`unpermute` for rows the experts already weighted (GroupedExperts' row_weights): each row added
    to its token -> y_TD (fp32).

    On CPU an index_add: deterministic there, and its backward is one gather of the (T, D) gradient.
    Elsewhere `combine_by_scatter` (index_add is atomic on GPU), which costs 3.2x on CPU (T 4,096, K 8,
    D 256, forward + backward, one quiet thread: 67 vs 21 ms), mostly in backward, where the sum's
    expanded gradient is copied out to (T, K, D) before the scatter's gather reads it.
    """
    if y_ND.device.type == "cpu":
        return _AddRowsToTokens.apply(y_ND.float(), sort_idx_N // top_k, sort_idx_N.numel() // top_k)
    return combine_by_scatter(y_ND, sort_idx_N, top_k)


def combine_by_scatter(y_ND: torch.Tensor, sort_idx_N: torch.Tensor, top_k: int) -> torch.Tensor:
    """`combine` as a scatter back to (token, k) order and a sum over k: no atomics (the GPU path)."""
    return scatter_rows(y_ND, sort_idx_N).view(-1, top_k, y_ND.shape[-1]).float().sum(dim=1)


class _AddRowsToTokens(torch.autograd.Function):
    """y_TD[token_N[n]] += y_ND[n]. Its own backward because index_add_'s autograd keeps `source` (for its
    shape), an N x D copy alive until backward; this one keeps only the index."""

    @staticmethod
    def forward(ctx, y_ND, token_N, num_tokens: int):
        ctx.save_for_backward(token_N)
        return y_ND.new_zeros(num_tokens, y_ND.shape[-1]).index_add_(0, token_N, y_ND)

    @staticmethod
    def backward(ctx, grad_TD):
        (token_N,) = ctx.saved_tensors
        return grad_TD.index_select(0, token_N), None, None


def rows_weights(topk_w_TK: torch.Tensor, sort_idx_N: torch.Tensor) -> torch.Tensor:
    """w_N: each routed row's weight, in the expert order of `permute`."""
    return topk_w_TK.reshape(-1).index_select(0, sort_idx_N)


class DispatchSteps(NamedTuple):
    """The permute-side steps for one moe.kernels choice. `combine` is set where the experts should weight
    their rows (GroupedExperts' row_weights) and the rows then only be summed per token: the torch path.
    The Triton un-permute weights as it gathers, at no extra cost, so it has none."""

    permute: Callable
    gather_rows: Callable
    unpermute: Callable
    combine: Callable | None


def dispatch_steps(choice: str, device: torch.device) -> DispatchSteps:
    """The steps for moe.kernels=`choice`; the Triton ones pass a `Plan` where the torch ones pass
    sort_idx_N, and callers treat it as opaque."""
    kernels = kernel_module(choice, device)
    if kernels is None:
        return DispatchSteps(permute, gather_rows, unpermute, combine)
    return DispatchSteps(kernels.permute, kernels.gather_rows, kernels.unpermute, None)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _grouped_mm_op():
    """torch's grouped GEMM: F.grouped_mm, or torch._grouped_mm on builds that predate it; None if neither.
    On CUDA it multiplies bf16 with fp32 accumulation (one rounding, at the output)."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_supported(x_ND: torch.Tensor, w_EFD: torch.Tensor) -> bool:
    """torch's grouped GEMM wants 16-byte aligned rows, and on CUDA (and under torch.compile) bf16 (SM >= 80).
    Elsewhere (fp32 under compile, fp32 on CUDA, no grouped GEMM at all) the per-expert loop runs instead."""
    if _grouped_mm_op() is None:
        return False
    dtype = _compute_dtype(x_ND)
    size = torch.empty((), dtype=dtype).element_size()
    if (w_EFD.shape[1] * size) % 16 or (w_EFD.shape[2] * size) % 16:
        return False
    if x_ND.device.type == "cpu":
        # eager CPU takes any float dtype, but the meta kernel torch.compile traces with insists on bf16
        return dtype == torch.bfloat16 or not torch.compiler.is_compiling()
    return x_ND.device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability()[0] >= 8


def grouped_swiglu_up(x_ND, w1_EFD, w3_EFD, counts_E, w_N=None, ops: Elementwise = ELEMENTWISE) -> torch.Tensor:
    """h_NF = silu(x W1^T) * (x W3^T) for all experts in two grouped GEMMs, each row scaled by w_N[n] when
    given (`ops.weighted_swiglu`); expert e owns rows offs[e-1]:offs[e] (some may own none)."""
    offs_E = counts_E.cumsum(0).to(torch.int32)
    dtype = _compute_dtype(x_ND)  # grouped_mm has no autocast rule: cast explicitly
    x_ND, mm = x_ND.to(dtype), _grouped_mm_op()
    gate_NF = mm(x_ND, w1_EFD.to(dtype).transpose(-2, -1), offs=offs_E)
    up_NF = mm(x_ND, w3_EFD.to(dtype).transpose(-2, -1), offs=offs_E)
    return ops.swiglu(gate_NF, up_NF) if w_N is None else ops.weighted_swiglu(gate_NF, up_NF, w_N)


def grouped_swiglu_down(h_NF, w2_EDF, counts_E) -> torch.Tensor:
    """y_ND = h W2^T per expert, one grouped GEMM."""
    offs_E = counts_E.cumsum(0).to(torch.int32)
    return _grouped_mm_op()(h_NF, w2_EDF.to(h_NF.dtype).transpose(-2, -1), offs=offs_E)


def looped_swiglu_up(x_ND, w1_EFD, w3_EFD, counts_E, w_N=None, ops: Elementwise = ELEMENTWISE) -> torch.Tensor:
    """Reference / fallback for grouped_swiglu_up: one expert at a time (one host sync for the counts)."""
    h_NF = _looped(x_ND, counts_E, w1_EFD.shape[1], lambda e, xe: ops.swiglu(xe @ w1_EFD[e].T, xe @ w3_EFD[e].T))
    return h_NF if w_N is None else weight_rows(h_NF, w_N)


def looped_swiglu_down(h_NF, w2_EDF, counts_E) -> torch.Tensor:
    return _looped(h_NF, counts_E, w2_EDF.shape[1], lambda e, he: he @ w2_EDF[e].T)


def _looped(rows, counts_E, width: int, fn) -> torch.Tensor:
    """fn(e, expert e's slice of `rows`) for each expert with rows, concatenated; (N, width)."""
    outs, start = [], 0
    for e, n in enumerate(counts_E.tolist()):
        if n:
            outs.append(fn(e, rows[start : start + n]))
        start += n
    if start < rows.shape[0]:  # rows past sum(counts) (padding) belong to no expert
        outs.append(rows.new_zeros(rows.shape[0] - start, width))
    return torch.cat(outs) if outs else rows.new_zeros(0, width)


def grouped_swiglu(x_ND, w1_EFD, w3_EFD, w2_EDF, counts_E) -> torch.Tensor:
    """All experts in three grouped GEMMs."""
    return grouped_swiglu_down(grouped_swiglu_up(x_ND, w1_EFD, w3_EFD, counts_E), w2_EDF, counts_E)


def looped_swiglu(x_ND, w1_EFD, w3_EFD, w2_EDF, counts_E) -> torch.Tensor:
    """Reference / fallback: one expert at a time."""
    return looped_swiglu_down(looped_swiglu_up(x_ND, w1_EFD, w3_EFD, counts_E), w2_EDF, counts_E)


class RowWeights:
    """Each routed row's routing weight (w_N, fp32, in the experts' row order), for the experts to multiply
    into their SwiGLU product. A plain object rather than a tensor argument: FSDP2's mixed precision casts
    the floating tensors a wrapped module's forward receives (expert parallelism wraps the experts), even
    inside tuples and dataclasses, and routing weights stay fp32."""

    __slots__ = ("w_N",)

    def __init__(self, w_N: torch.Tensor):
        self.w_N = w_N


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as stacked 3-D weights: w1 (gate) and w3 (up) are (E, F, D), w2 (down)
    is (E, D, F). forward(x, counts_E, gather=None, row_weights=None): rows gather(x) (x itself without a
    gather) sorted by expert, counts_E with one entry per expert this module holds (E_local = w1.shape[0]
    under expert parallelism); experts may get 0 rows. `row_weights` (optional) scales each row's SwiGLU
    product h before the down projection, which equals scaling the output (the projection is linear) at
    F/D of the cost, and backward then keeps no N x D copy of the outputs for the weights' gradient.

    `recompute` (moe.recompute): backward keeps W1x and W3x and the (weighted) SwiGLU product h (the input
    of the down projection), and recomputes the gathered rows (N x D) and silu(W1x) (N x F) from x and W1x
    instead of keeping them. Dispatchers pass the gather in, not its result, so it falls in that region.
    That region runs the eager elementwise functions: its policy picks what to keep op by op, and a fused
    (compiled) function is one opaque op to it.
    """

    use_grouped_mm = True  # set False (class or instance) to force the per-expert loop

    def __init__(self, num_experts: int, dim: int, hidden: int, recompute: bool = False):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.recompute = recompute
        self.elementwise = ELEMENTWISE  # kimi.parallel may swap in fused (compiled) versions

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]

    def forward(
        self, x: torch.Tensor, counts_E: torch.Tensor, gather=None, row_weights: RowWeights | None = None
    ) -> torch.Tensor:
        if counts_E.shape[0] != self.num_experts:
            raise ValueError(
                f"counts_E has {counts_E.shape[0]} entries but this module holds {self.num_experts} experts"
            )
        grouped = self.use_grouped_mm and grouped_mm_supported(x, self.w1)
        up, down = (grouped_swiglu_up, grouped_swiglu_down) if grouped else (looped_swiglu_up, looped_swiglu_down)
        w_N = None if row_weights is None else row_weights.w_N
        ops = ELEMENTWISE if self.recompute else self.elementwise

        def rows_up(x, w1_EFD, w3_EFD):  # weights as arguments: under EP they are this forward's local views
            return up(x if gather is None else gather(x), w1_EFD, w3_EFD, counts_E, w_N, ops)

        if self.recompute:
            h_NF = recompute(rows_up, x, self.w1, self.w3, keep=MATMULS)
        else:
            h_NF = rows_up(x, self.w1, self.w3)
        return down(h_NF, self.w2, counts_E)

    def extra_repr(self) -> str:
        return f"recompute={self.recompute}" if self.recompute else ""


class LocalDispatcher:
    """Single-device dispatch: permute, gather, run the experts, un-permute/weight/sum. A plain callable
    (not a Module) so an expert-parallel replacement of any kind can be assigned over it."""

    def __init__(self, kernels: str = "torch"):
        self.kernels = kernels  # moe.kernels

    def __call__(self, x_TD, topk_idx_TK, topk_w_TK, experts: GroupedExperts) -> torch.Tensor:
        steps = dispatch_steps(self.kernels, x_TD.device)
        sort_idx_N, counts_E = steps.permute(topk_idx_TK, experts.num_experts)
        K = topk_idx_TK.shape[1]
        gather = lambda x: steps.gather_rows(x, sort_idx_N, K)  # noqa: E731
        if steps.combine is None:
            return steps.unpermute(experts(x_TD, counts_E, gather=gather), sort_idx_N, topk_w_TK).to(x_TD.dtype)
        # the experts weight their F-wide rows; the un-permute then only sums, with no D-wide multiply
        y_ND = experts(x_TD, counts_E, gather=gather, row_weights=RowWeights(rows_weights(topk_w_TK, sort_idx_N)))
        return steps.combine(y_ND, sort_idx_N, K).to(x_TD.dtype)

    def __repr__(self) -> str:
        return f"LocalDispatcher(kernels={self.kernels!r})"


class MoE(FP32Buffers, nn.Module):
    """Routed experts + fused shared experts, with aux-loss-free load balancing.

    forward(x_BLD) -> y_BLD and sets `self.aux_loss` (0-dim; zero unless a balance-loss coef is set).
    Training forwards add their selected-token counts to `tokens_per_expert` (fp32 even in a model cast
    to bf16, not saved), so gradient-accumulation micro-batches add up until `update_bias()` consumes
    and zeros them.
    """

    fp32_buffers = ("tokens_per_expert", "_entropy_sum")

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.router = Router(dim, cfg.num_experts, cfg.score_func)
        self.experts = GroupedExperts(cfg.num_experts, dim, cfg.expert_hidden, cfg.recompute)
        n_shared = cfg.n_shared_experts
        self.shared_experts = MLP(dim, n_shared * cfg.expert_hidden) if n_shared > 0 else None
        self.dispatcher = LocalDispatcher(cfg.kernels)
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.num_experts), persistent=False)
        self.register_buffer("_entropy_sum", torch.zeros(2), persistent=False)  # [sum, count] since update
        self.aux_loss = torch.zeros(())
        self._last_counts_E: torch.Tensor | None = None  # what the last update_bias consumed
        self._last_entropy_sum: torch.Tensor | None = None

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        B, L, D = x_BLD.shape
        cfg = self.cfg
        x_TD = x_BLD.reshape(B * L, D)
        # Routing (scores, choices, weights, aux losses) in fp32 with autocast off. The cast boundary is
        # the dispatcher: experts run in the activation / autocast dtype, and their outputs come back
        # weighted by the fp32 topk_w and summed in fp32 (unpermute), then cast to x's dtype.
        with fp32_region(x_TD.device):
            scores_TE, topk_idx_TK, topk_w_TK, y_scale = self._route(x_TD)
            if cfg.capacity_factor is not None:
                # Overflow assignments get weight 0: the output is exactly that of dropping them, while
                # the dispatcher seam keeps its fixed (T, K) shapes.
                capacity = math.ceil(cfg.capacity_factor * topk_idx_TK.numel() / self.num_experts)
                topk_w_TK = topk_w_TK * capacity_keep(topk_idx_TK, self.num_experts, capacity)
            self.aux_loss = self._aux_loss(scores_TE, topk_idx_TK, B)
        y_TD = self.dispatcher(x_TD, topk_idx_TK, topk_w_TK, self.experts)
        if y_scale != 1.0:
            y_TD = y_TD * y_scale
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        if self.training and not recomputing():  # a recomputed block routes again: count once
            self._accumulate(scores_TE, topk_idx_TK)
        return y_TD.view(B, L, D)

    def _route(self, x_TD):
        """(scores_TE, topk_idx_TK, topk_w_TK, y_scale): the torch steps, or the fused Triton router (which
        folds routed_scaling_factor into the weights, so y_scale is 1 there)."""
        cfg, bias_E = self.cfg, self.router.expert_bias
        kernels = kernel_module(cfg.kernels, x_TD.device)
        if kernels is None:
            scores_TE = self.router(x_TD)
            topk_idx_TK, topk_w_TK = route(
                scores_TE, bias_E, self.top_k, cfg.n_group, cfg.topk_group, cfg.norm_topk_prob
            )
            return scores_TE, topk_idx_TK, topk_w_TK, cfg.routed_scaling_factor
        logits_TE = self.router.logits(x_TD)
        topk_w_TK, topk_idx_TK, _ = kernels.fused_route(
            logits_TE,
            bias_E,
            self.top_k,
            cfg.score_func,
            cfg.n_group,
            cfg.topk_group,
            cfg.norm_topk_prob,
            cfg.routed_scaling_factor,
        )
        return self.router.scores(logits_TE), topk_idx_TK, topk_w_TK, 1.0  # scores: aux losses, entropy

    def _aux_loss(self, scores_TE, topk_idx_TK, batch_size: int) -> torch.Tensor:
        loss = scores_TE.new_zeros(())
        if self.cfg.seq_aux_loss_coef > 0:
            loss = loss + self.cfg.seq_aux_loss_coef * seq_aux_loss(scores_TE, topk_idx_TK, batch_size)
        if self.cfg.aux_loss_coef > 0:
            loss = loss + self.cfg.aux_loss_coef * switch_aux_loss(scores_TE, topk_idx_TK)
        return loss

    @torch.no_grad()
    def _accumulate(self, scores_TE, topk_idx_TK) -> None:
        counts_E = expert_counts(topk_idx_TK.reshape(-1), self.num_experts)
        self.tokens_per_expert.add_(counts_E.to(self.tokens_per_expert.dtype))
        self._entropy_sum[0] += router_entropy(scores_TE)
        self._entropy_sum[1] += 1

    @torch.no_grad()
    def update_bias(self, tokens_per_expert_E: torch.Tensor | None = None) -> None:
        """bias += rate * sign(mean_load - load) (when moe.aux_loss_free), then zero the counts.

        Pass `tokens_per_expert_E` to use counts summed over data-parallel ranks; otherwise this
        module's own accumulated counts are used. Underloaded experts become more likely to be chosen.
        """
        bias_E = self.router.expert_bias
        counts_E = (self.tokens_per_expert if tokens_per_expert_E is None else tokens_per_expert_E).detach()
        counts_E = counts_E.to(device=bias_E.device, dtype=torch.float32)
        if self.cfg.aux_loss_free:
            bias_E.add_(self.cfg.bias_update_rate * torch.sign(counts_E.mean() - counts_E))
        self._last_counts_E = counts_E.clone()
        self._last_entropy_sum = self._entropy_sum.clone()  # no host sync here: the step's hot path
        self.tokens_per_expert.zero_()
        self._entropy_sum.zero_()

    @torch.no_grad()
    def discard_counts(self) -> None:
        """Forget the counts accumulated since the last update_bias (a step whose update is skipped)."""
        self.tokens_per_expert.zero_()
        self._entropy_sum.zero_()

    @torch.no_grad()
    def routing_stats(self, tokens_per_expert_E: torch.Tensor | None = None) -> dict:
        """Load statistics: counts given, else accumulated since the last update_bias, else the counts
        that update consumed. max_load = max/mean (1 = perfect), load_cv = std/mean, router_entropy =
        mean entropy (nats) of the normalised router scores over training forwards since the update."""
        counts_E = tokens_per_expert_E
        if counts_E is None:
            counts_E = self.tokens_per_expert
            if float(counts_E.sum()) == 0 and self._last_counts_E is not None:
                counts_E = self._last_counts_E
        counts_E = counts_E.detach().float().cpu()
        mean = float(counts_E.mean())
        ent_sum, n_fwd = self._entropy_sum.tolist()
        if n_fwd == 0 and self._last_entropy_sum is not None:
            ent_sum, n_fwd = self._last_entropy_sum.tolist()
        entropy = ent_sum / n_fwd if n_fwd > 0 else None
        return {
            "tokens_per_expert": counts_E.tolist(),
            "max_load": float(counts_E.max()) / mean if mean > 0 else 0.0,
            "load_cv": float(counts_E.std(unbiased=False)) / mean if mean > 0 else 0.0,
            "router_entropy": float("nan") if entropy is None else entropy,
        }
