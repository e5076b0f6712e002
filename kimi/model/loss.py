"""The output head, and the fused linear cross-entropy that lets training skip the full logits.

Legend: N tokens (B*T), C tokens of one chunk, D model dim, V vocabulary.

At GPT-2's 50257-token vocabulary the (N, V) fp32 logits and their gradient are most of a CPU training
step's memory (two 820 MB tensors at 16 x 256 tokens) and the softmax over them a large share of its time.
`linear_cross_entropy` walks the tokens in chunks of C: each chunk's logits exist only while the chunk is
processed, and its gradients (d h, d w) are computed right there, in forward (the Liger-Kernel approach).
The alternative, Cut Cross-Entropy's, keeps only the log-sum-exp in forward and recomputes each chunk's
logits in backward: it holds less between forward and backward (no d h, d w) but runs the (C, D) x (D, V)
matmul twice, four head matmuls instead of three. Measured on the 2-core CPU (4096 tokens, D 256, V 50257,
C 256, one thread): head forward + backward 8.3 s this way, 12.8 s recomputing, 9.4 s with the full logits;
peak RSS 492, 439 and 2644 MB. The extra memory here is one (V, D) and one (N, D) fp32 tensor, small next to
a chunk's logits. The price: gradients are computed before anyone asks for them (a forward under
torch.no_grad(), as evaluation runs, skips them), which is sound only because the loss is a scalar, so
backward just rescales them (by 1 / accumulation steps, say).
"""

from __future__ import annotations

import torch
from torch import nn

from kimi.model.layers import fp32_region


def linear_cross_entropy(h_ND: torch.Tensor, w_VD: torch.Tensor, targets_N: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mean over targets != -1 of cross_entropy(h_ND @ w_VD.T, targets_N) (F.cross_entropy's value with
    ignore_index=-1: NaN when every target is -1, with zero gradients), with the logits in fp32 and computed
    `chunk` tokens at a time. Under autocast the matmuls run in autocast's dtype, as F.linear's would."""
    dev = h_ND.device.type
    autocast = torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)
    mm_dtype = torch.get_autocast_dtype(dev) if autocast else h_ND.dtype
    want_grads = torch.is_grad_enabled() and (h_ND.requires_grad or w_VD.requires_grad)
    return _LinearCrossEntropy.apply(h_ND, w_VD, targets_N, chunk, mm_dtype, want_grads)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, w_VD, targets_N, chunk: int, mm_dtype: torch.dtype, want_grads: bool):
        with fp32_region(h_ND.device):  # autocast off: every cast in _chunks is explicit
            loss, dh_ND, dw_VD = _chunks(h_ND, w_VD, targets_N, chunk, mm_dtype, want_grads)
        if want_grads:
            ctx.save_for_backward(dh_ND, dw_VD)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # only reached when want_grads: otherwise the loss has no grad_fn
        dh_ND, dw_VD = ctx.saved_tensors
        # The loss is a scalar: backward only rescales what forward computed (by 1 / grad accumulation, say).
        return dh_ND * grad_loss.to(dh_ND.dtype), dw_VD * grad_loss.to(dw_VD.dtype), None, None, None, None


def _chunks(h_ND, w_VD, targets_N, chunk, mm_dtype, want_grads):
    """(loss, d loss / d h or None, d loss / d w or None)."""
    N = h_ND.shape[0]
    valid_N = targets_N != -1
    n_valid = valid_N.sum()  # a tensor: no host sync
    # Gradient rows are scaled by 1/n_valid; clamped so that all-ignored targets give zero gradients as
    # F.cross_entropy does, while the loss stays sum/0 = NaN as its does.
    scale_N = valid_N.float() / n_valid.clamp(min=1)
    hm_ND, wm_VD = h_ND.to(mm_dtype), w_VD.to(mm_dtype)  # autocast's copies (the weight's is one (V, D) cast)
    loss_sum = torch.zeros((), dtype=torch.float32, device=h_ND.device)
    dh_ND = torch.empty_like(h_ND) if want_grads else None
    dw_VD = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device) if want_grads else None
    for s in range(0, N, chunk):
        h_CD, t_C, valid_C = hm_ND[s : s + chunk], targets_N[s : s + chunk], valid_N[s : s + chunk]
        logits_CV = (h_CD @ wm_VD.T).float()
        t_C1 = t_C.clamp(min=0).unsqueeze(1)  # ignored rows gather column 0, then are masked out
        target_C = logits_CV.gather(1, t_C1).squeeze(1)
        # One exp over the chunk, in place, for both the log-sum-exp and the softmax: e = exp(logits - max),
        # lse = max + log(sum e), softmax = e / sum e. (torch.logsumexp would allocate its own (C, V)
        # temporary and exponentiate, and the softmax a second time.) An overflowed (inf) logit makes the
        # loss NaN here where logsumexp gives inf: non-finite either way, which the trainer's guard handles.
        max_C1 = logits_CV.amax(dim=-1, keepdim=True)
        e_CV = logits_CV.sub_(max_C1).exp_()
        sum_C = e_CV.sum(dim=-1)
        loss_sum += ((max_C1.squeeze(1) + sum_C.log() - target_C) * valid_C).sum()
        if not want_grads:
            continue
        # d CE / d logits = softmax - one_hot(target), per valid row, over n_valid; in place on e.
        scale_C = scale_N[s : s + chunk]
        g_CV = e_CV.mul_((scale_C / sum_C).unsqueeze(1))
        g_CV.scatter_add_(1, t_C1, -scale_C.unsqueeze(1))
        gm_CV = g_CV.to(mm_dtype)
        dh_ND[s : s + chunk] = gm_CV @ wm_VD
        if mm_dtype == torch.float32:
            dw_VD.addmm_(gm_CV.T, h_CD)
        else:  # each chunk's product in the matmul dtype, summed over chunks in fp32
            dw_VD += gm_CV.T @ h_CD
    loss = loss_sum / n_valid
    return loss, dh_ND, None if dw_VD is None else dw_VD.to(w_VD.dtype)


class LMHead(nn.Linear):
    """The output head: `head(h)` is the logits (..., V), as nn.Linear's; `head(h_ND, targets_N)` is the mean
    cross-entropy of those logits computed `chunk_tokens` tokens at a time (linear_cross_entropy), never
    holding them whole. Either way through this module's forward, so hooks on it (FSDP2's, a test's) run.
    No bias: a tied head (model.tie_embeddings) has none, and K2's has none."""

    def __init__(self, n_embd: int, vocab_size: int, chunk_tokens: int):
        super().__init__(n_embd, vocab_size, bias=False)
        self.chunk_tokens = chunk_tokens

    def forward(self, h: torch.Tensor, targets_N: torch.Tensor | None = None) -> torch.Tensor:
        if targets_N is None:
            return super().forward(h)
        return linear_cross_entropy(h, self.weight, targets_N, self.chunk_tokens)
