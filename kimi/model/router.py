"""Top-k routing for the MoE layer: scores, aux-loss-free selection bias, group-limited top-k, aux losses.

Legend: B batch, T tokens (flattened B*L in the MoE), L sequence length, D model dim, E experts,
K experts per token (top_k), G expert groups.

All routing math runs in fp32 (as HF DeepSeek-V3 does), whatever the activation dtype: top-k choices
flip on tiny differences, the weights multiply every routed output, and the aux-loss-free bias moves in
steps (1e-3) finer than bf16's spacing near a sigmoid score of 0.5 (~4e-3). Under bf16 autocast a
`.float()` alone is not enough (autocast re-casts F.linear to bf16: scores measured on 64 tokens x 4
experts took 82 distinct values instead of 256, and 1 token in 64 changed its top-2), so the router and
MoE.forward's routing block run with autocast off (`fp32_region`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kimi.model.layers import FP32Buffers, fp32_region


class Router(FP32Buffers, nn.Module):
    """Scores tokens against experts. `weight` (E, D) is trained (by AdamW: its name contains 'router');
    `expert_bias` (E,) fp32 is the aux-loss-free balancing bias, a persistent buffer updated outside
    autograd by `MoE.update_bias` and used for expert SELECTION only (HF: e_score_correction_bias).
    It stays fp32 when the module is cast to bf16 (FP32Buffers)."""

    fp32_buffers = ("expert_bias",)

    def __init__(self, dim: int, num_experts: int, score_func: str = "sigmoid"):
        super().__init__()
        self.score_func = score_func
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Unbiased scores_TE in fp32: sigmoid (K2 / V3) or softmax of the router logits."""
        return self.scores(self.logits(x_TD))

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Router logits_TE in fp32 with autocast off (what the fused Triton router takes)."""
        with fp32_region(x_TD.device):
            return F.linear(x_TD.float(), self.weight.float())

    def scores(self, logits_TE: torch.Tensor) -> torch.Tensor:
        with fp32_region(logits_TE.device):
            return logits_TE.sigmoid() if self.score_func == "sigmoid" else logits_TE.softmax(dim=-1)


def route(
    scores_TE: torch.Tensor,
    bias_E: torch.Tensor | None,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose top_k experts per token; return (topk_idx_TK, topk_w_TK).

    Selection uses scores + bias; the weights are the UNBIASED scores of the chosen experts (so the
    bias steers load without changing what the model computes for a given choice). With n_group > 1,
    a token may only pick from the topk_group groups whose score (sum of the group's top-2 biased
    scores, DeepSeek-V3) is highest. norm_topk_prob renormalises the K weights to sum to 1.

    Ties go to the LOWEST expert (and group) index and the K choices come in descending order, NaN first:
    the fused Triton router's rule, so moe.kernels can change on resume without changing a choice.
    torch.topk's tie order is unspecified (an all-equal row gave [6, 5, 4]); a stable sort is exact, and
    costs little at these widths (E <= a few hundred) next to the expert matmuls.
    """
    T, E = scores_TE.shape
    choice_TE = scores_TE if bias_E is None else scores_TE + bias_E.float()
    if n_group > 1:
        per_group = E // n_group
        group_TG = choice_TE.view(T, n_group, per_group).topk(min(2, per_group), dim=-1).values.sum(dim=-1)
        keep_idx = group_TG.sort(dim=-1, descending=True, stable=True).indices[:, :topk_group]
        keep_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(1, keep_idx, True)
        keep_TE = keep_TG[:, :, None].expand(T, n_group, per_group).reshape(T, E)
        choice_TE = choice_TE.masked_fill(~keep_TE, float("-inf"))
    topk_idx_TK = choice_TE.sort(dim=-1, descending=True, stable=True).indices[:, :top_k].contiguous()
    topk_w_TK = scores_TE.gather(1, topk_idx_TK)
    if norm_topk_prob:
        topk_w_TK = topk_w_TK / (topk_w_TK.sum(dim=-1, keepdim=True) + 1e-20)
    return topk_idx_TK, topk_w_TK


def expert_counts(flat_idx_N: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert (E,) int64. index_add rather than bincount, which syncs with the host on
    CUDA to size its output; integer adds are exact, so this is deterministic too."""
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=flat_idx_N.device)
    return counts_E.index_add_(0, flat_idx_N, torch.ones_like(flat_idx_N))


def capacity_keep(topk_idx_TK: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """Bool mask (T, K): which assignments fit in each expert's `capacity` slots.

    Deterministic: slots go in flattened (token, k) order, so earlier tokens win; the rest overflow.
    """
    flat_N = topk_idx_TK.reshape(-1)
    onehot_NE = F.one_hot(flat_N, num_experts)
    rank_N = (onehot_NE.cumsum(dim=0) * onehot_NE).sum(dim=-1) - 1  # arrival order within its expert
    return (rank_N < capacity).view_as(topk_idx_TK)


def normalised_probs(scores_TE: torch.Tensor) -> torch.Tensor:
    """Scores as a distribution over experts (sigmoid scores are divided by their sum; softmax already is)."""
    return scores_TE / (scores_TE.sum(dim=-1, keepdim=True) + 1e-20)


def seq_aux_loss(scores_TE: torch.Tensor, topk_idx_TK: torch.Tensor, batch_size: int) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance loss, averaged over sequences: sum_i f_i * P_i with
    f_i = E / (K * L) * #(tokens of the sequence choosing i) and P_i = mean over the sequence of the
    normalised score of i. Equals 1 for perfectly uniform routing. Gradient flows through P only."""
    T, E = scores_TE.shape
    K = topk_idx_TK.shape[1]
    L = T // batch_size
    probs_BLE = normalised_probs(scores_TE).view(batch_size, L, E)
    counts_BE = torch.zeros(batch_size, E, device=scores_TE.device, dtype=torch.float32)
    counts_BE.scatter_add_(
        1, topk_idx_TK.view(batch_size, L * K), torch.ones(batch_size, L * K, device=counts_BE.device)
    )
    f_BE = counts_BE * (E / (K * L))
    return (f_BE * probs_BLE.mean(dim=1)).sum(dim=-1).mean()


def switch_aux_loss(scores_TE: torch.Tensor, topk_idx_TK: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer balance loss over the whole batch: E * sum_i f_i * P_i, with f_i the fraction of
    the T*K assignments sent to i and P_i the mean normalised score. Equals 1 when uniform."""
    T, E = scores_TE.shape
    counts_E = expert_counts(topk_idx_TK.reshape(-1), E).float()
    f_E = counts_E / topk_idx_TK.numel()
    return E * (f_E * normalised_probs(scores_TE).mean(dim=0)).sum()


@torch.no_grad()
def router_entropy(scores_TE: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the entropy (nats) of the normalised scores: log(E) = uniform, 0 = one-hot."""
    p_TE = normalised_probs(scores_TE.float())
    return -(p_TE * p_TE.clamp_min(1e-20).log()).sum(dim=-1).mean()
