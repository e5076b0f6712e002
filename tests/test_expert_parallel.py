"""AllToAllDispatcher vs a single-process reference on hand-built routings (gloo CPU, 2 and 4 ranks).

The global batch is R * T tokens; rank r holds rows [r*T, (r+1)*T) and experts [r*L, (r+1)*L). The
reference runs every expert on the whole batch in one process. Outputs and gradients (tokens, routing
weights, expert weights) must agree to 1e-6 in fp32. Loss = sum(y * g) with a fixed random g, so the
global loss is the sum of the ranks' losses and the expert grads on their owner need no rescaling.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kimi.model.moe import GroupedExperts
from tests.dist_utils import run_distributed

D, FF, TOL = 8, 8, 1e-6  # 32-byte rows: the CPU grouped_mm path runs


def make_experts(E: int) -> GroupedExperts:
    experts = GroupedExperts(E, D, FF)
    for p in experts.parameters():
        nn.init.normal_(p, std=0.3)
    return experts


def reference(x_TD, idx_TK, w_TK, experts):
    y_TD = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for k in range(idx_TK.shape[1]):
            e = int(idx_TK[t, k])
            h = F.silu(x_TD[t] @ experts.w1[e].T) * (x_TD[t] @ experts.w3[e].T)
            y_TD[t] = y_TD[t] + w_TK[t, k] * (h @ experts.w2[e].T)
    return y_TD


# Hand-built routings: (per-rank token counts, global top-k expert ids). Cases cover experts that get no
# tokens, a rank that sends nothing to another rank, and a rank with no tokens at all.
ROUTINGS = {
    2: [
        ([3, 3], [[0, 1], [1, 0], [0, 1], [2, 0], [2, 1], [0, 2]]),  # rank 0 sends nothing to rank 1; e3 idle
        ([2, 0], [[3, 2], [2, 3]]),  # rank 1 holds no tokens; experts 0, 1 idle
    ],
    4: [
        ([2, 3, 1, 2], [[0, 7], [7, 1], [2, 3], [2, 3], [3, 2], [5, 0], [5, 4], [4, 5]]),  # e6 idle
        ([1, 0, 2, 1], [[1, 0], [0, 1], [1, 0], [0, 1]]),  # all tokens to rank 0; ranks 1-3 get nothing
    ],
}


def _body(rank, world_size):
    from kimi.parallel.expert_parallel import AllToAllDispatcher

    E, K = 2 * world_size, 2
    L = E // world_size
    for sizes, idx in ROUTINGS[world_size]:
        torch.manual_seed(0)
        full = make_experts(E)
        idx_TK = torch.tensor(idx)
        x_TD = torch.randn(sum(sizes), D, requires_grad=True)
        w_TK = torch.rand(sum(sizes), K, requires_grad=True)
        g_TD = torch.randn(sum(sizes), D)
        y_ref = reference(x_TD, idx_TK, w_TK, full)
        (y_ref * g_TD).sum().backward()

        lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        local = make_experts(L)
        with torch.no_grad():
            for n, p in local.named_parameters():
                p.copy_(getattr(full, n)[rank * L : (rank + 1) * L])
        x = x_TD.detach()[lo:hi].clone().requires_grad_()
        w = w_TK.detach()[lo:hi].clone().requires_grad_()
        y = AllToAllDispatcher(torch.distributed.group.WORLD, E)(x, idx_TK[lo:hi], w, local)
        (y * g_TD[lo:hi]).sum().backward()

        torch.testing.assert_close(y, y_ref[lo:hi], atol=TOL, rtol=TOL)
        torch.testing.assert_close(x.grad, x_TD.grad[lo:hi], atol=TOL, rtol=TOL)
        torch.testing.assert_close(w.grad, w_TK.grad[lo:hi], atol=TOL, rtol=TOL)
        for n, p in local.named_parameters():
            torch.testing.assert_close(p.grad, getattr(full, n).grad[rank * L : (rank + 1) * L], atol=TOL, rtol=TOL)


@pytest.mark.parametrize("world_size", [2, 4])
def test_all_to_all_dispatcher_matches_reference(world_size):
    run_distributed(_body, world_size)
