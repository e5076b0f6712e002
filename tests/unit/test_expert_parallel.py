"""AllToAllDispatcher vs a single-process reference on hand-built routings (gloo CPU, 4 ranks: one EP group
of 4, then two EP groups of 2 exchanging at once), and apply_expert_parallel on a real KimiModel.

The global batch is R * T tokens; rank r holds rows [r*T, (r+1)*T) and experts [r*L, (r+1)*L). The
reference runs every expert on the whole batch in one process. Outputs and gradients (tokens, routing
weights, expert weights) must agree to 1e-6 in fp32. Loss = sum(y * g) with a fixed random g, so the
global loss is the sum of the ranks' losses and the expert grads on their owner need no rescaling.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

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


def check_routings(group, routings, make_dispatcher=None) -> None:
    """`make_dispatcher(group, E)` builds the dispatcher under test (default: AllToAllDispatcher)."""
    from kimi.parallel.expert_parallel import AllToAllDispatcher

    make_dispatcher = make_dispatcher or AllToAllDispatcher
    rank, R, K = dist.get_rank(group), dist.get_world_size(group), 2
    E = 2 * R
    L = E // R
    for sizes, idx in routings:
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
        y = make_dispatcher(group, E)(x, idx_TK[lo:hi], w, local)
        (y * g_TD[lo:hi]).sum().backward()

        torch.testing.assert_close(y, y_ref[lo:hi], atol=TOL, rtol=TOL)
        torch.testing.assert_close(x.grad, x_TD.grad[lo:hi], atol=TOL, rtol=TOL)
        torch.testing.assert_close(w.grad, w_TK.grad[lo:hi], atol=TOL, rtol=TOL)
        for n, p in local.named_parameters():
            torch.testing.assert_close(p.grad, getattr(full, n).grad[rank * L : (rank + 1) * L], atol=TOL, rtol=TOL)


def check_apply_expert_parallel(ep_mesh) -> None:
    """A real KimiModel with EP applied (no FSDP): logits, expert grads and the state_dict vs one process.
    Each rank's loss is its slice's mean CE; the reference backpropagates the sum of those losses, which is
    what each rank's experts see through the all-to-all."""
    from kimi.config import KimiConfig
    from kimi.model import KimiModel
    from kimi.parallel import apply_expert_parallel

    rank, R, b = ep_mesh.get_local_rank(), ep_mesh.size(), 2
    cfg = KimiConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=8, moe=dict(num_experts=8, top_k=2))
    torch.manual_seed(0)
    ref = KimiModel(cfg)
    model = copy.deepcopy(ref)
    idx, tgt = torch.randint(0, 64, (R * b, 8)), torch.randint(0, 64, (R * b, 8))
    outs = [ref(idx[r * b : (r + 1) * b], tgt[r * b : (r + 1) * b]) for r in range(R)]
    sum(o.loss for o in outs).backward()

    apply_expert_parallel(model, ep_mesh)
    out = model(idx[rank * b : (rank + 1) * b], tgt[rank * b : (rank + 1) * b])
    out.loss.backward()
    torch.testing.assert_close(out.logits, outs[rank].logits, atol=TOL, rtol=TOL)
    sd, ref_sd = model.state_dict(), ref.state_dict()
    assert sd.keys() == ref_sd.keys()
    for m, m_ref in zip(model.moe_layers(), ref.moe_layers()):
        assert "AllToAllDispatcher" in repr(m.dispatcher)
        for n in ("w1", "w2", "w3"):
            p, p_ref = getattr(m.experts, n), getattr(m_ref.experts, n)
            assert isinstance(p, DTensor) and p.shape == p_ref.shape and p.to_local().shape[0] == 8 // R
            torch.testing.assert_close(p.full_tensor(), p_ref.detach())  # what a checkpoint would hold
            L = 8 // R
            torch.testing.assert_close(p.grad.to_local(), p_ref.grad[rank * L : (rank + 1) * L], atol=TOL, rtol=TOL)


def _body(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh

    # ep=4: the whole world; ep=2: two groups, [0, 1] and [2, 3], exchanging at the same time.
    check_routings(dist.group.WORLD, ROUTINGS[4])
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("other", "ep"))
    check_routings(mesh["ep"].get_group(), ROUTINGS[2])
    check_apply_expert_parallel(init_device_mesh("cpu", (4,), mesh_dim_names=("ep",)))


def test_all_to_all_dispatcher_matches_reference():
    run_distributed(_body, 4)
