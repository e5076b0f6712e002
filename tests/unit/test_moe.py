"""MoE: grouped GEMM vs loop vs a naive per-token reference, routing rules, balancing, aux losses, stats."""

import math

import pytest
import torch
import torch.nn.functional as F

from kimi.config import MoEConfig
from kimi.model.moe import GroupedExperts, LocalDispatcher, MoE, grouped_swiglu, looped_swiglu, permute
from kimi.model.router import route, seq_aux_loss, switch_aux_loss

D, FH, E = 16, 32, 8


def make_moe(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = MoEConfig(num_experts=E, top_k=2, expert_hidden=FH, **kw)
    m = MoE(D, cfg)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return m


def swiglu(x, w1, w3, w2):
    return (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def naive_moe(m: MoE, x_TD, keep_TK=None):
    """Per token, per chosen expert, in plain Python: the definition of the layer."""
    cfg = m.cfg
    scores = torch.sigmoid(x_TD.float() @ m.router.weight.float().T)
    idx, w = route(scores, m.router.expert_bias, cfg.top_k, cfg.n_group, cfg.topk_group, cfg.norm_topk_prob)
    out = torch.zeros_like(x_TD)
    ex = m.experts
    for t in range(x_TD.shape[0]):
        for k in range(cfg.top_k):
            if keep_TK is not None and not keep_TK[t, k]:
                continue
            e = idx[t, k]
            out[t] += w[t, k] * cfg.routed_scaling_factor * swiglu(x_TD[t], ex.w1[e], ex.w3[e], ex.w2[e])
    if m.shared_experts is not None:
        out += m.shared_experts(x_TD)
    return out


@pytest.mark.parametrize("grouped", [True, False])
def test_moe_matches_naive_reference(grouped, monkeypatch):
    m = make_moe(routed_scaling_factor=2.5, n_shared_experts=2)
    monkeypatch.setattr(m.experts, "use_grouped_mm", grouped)
    m.router.expert_bias.copy_(torch.randn(E) * 0.2)
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(1))
    y = m(x)
    torch.testing.assert_close(y.view(10, D), naive_moe(m, x.view(10, D)), rtol=1e-5, atol=1e-5)


def test_grouped_mm_matches_loop_with_empty_experts_and_grads():
    g = torch.Generator().manual_seed(2)
    ex = GroupedExperts(E, D, FH)
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.3, generator=g)
    counts = torch.tensor([3, 0, 5, 0, 0, 2, 1, 0])  # experts with no tokens, first and last included
    x = torch.randn(int(counts.sum()), D, generator=g, requires_grad=True)
    gy = torch.randn(x.shape[0], D, generator=g)
    results = []
    for fn in (grouped_swiglu, looped_swiglu):
        y = fn(x, ex.w1, ex.w3, ex.w2, counts)
        grads = torch.autograd.grad((y * gy).sum(), [x, ex.w1, ex.w3, ex.w2])
        results.append((y, grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # against an explicit per-expert reference
    start, ref = 0, []
    for e, n in enumerate(counts.tolist()):
        ref.append(swiglu(x[start : start + n], ex.w1[e], ex.w3[e], ex.w2[e]))
        start += n
    torch.testing.assert_close(results[0][0], torch.cat(ref), rtol=1e-5, atol=1e-5)


def test_grouped_experts_hold_a_subset_of_experts():
    """Expert parallelism slices the stacked weights: E_local experts, counts with E_local entries."""
    full = GroupedExperts(E, D, FH)
    torch.nn.init.normal_(full.w1), torch.nn.init.normal_(full.w3), torch.nn.init.normal_(full.w2)
    local = GroupedExperts(3, D, FH)
    with torch.no_grad():
        for n in ("w1", "w3", "w2"):
            getattr(local, n).copy_(getattr(full, n)[4:7])
    counts = torch.tensor([2, 0, 3])
    x = torch.randn(5, D)
    ref = torch.cat(
        [swiglu(x[:2], full.w1[4], full.w3[4], full.w2[4]), swiglu(x[2:], full.w1[6], full.w3[6], full.w2[6])]
    )
    for grouped in (True, False):
        local.use_grouped_mm = grouped
        torch.testing.assert_close(local(x, counts), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="holds 3 experts"):
        local(x, torch.tensor([1, 1, 1, 2]))


def test_permute_is_stable_by_expert():
    idx = torch.tensor([[2, 0], [0, 1], [2, 1]])
    sort_idx, counts = permute(idx, 4)
    assert counts.tolist() == [2, 2, 2, 0]
    assert sort_idx.tolist() == [1, 2, 3, 5, 0, 4]


def test_capacity_factor_drops_overflow_in_token_order():
    m = make_moe(capacity_factor=0.5)
    x = torch.randn(1, 16, D, generator=torch.Generator().manual_seed(3))
    x_TD = x.view(16, D)
    scores = torch.sigmoid(x_TD @ m.router.weight.T)
    idx, _ = route(scores, m.router.expert_bias, 2)
    capacity = math.ceil(0.5 * 32 / E)  # 2 slots per expert
    seen, keep = {}, torch.zeros_like(idx, dtype=torch.bool)
    for t in range(16):
        for k in range(2):
            e = int(idx[t, k])
            seen[e] = seen.get(e, 0) + 1
            keep[t, k] = seen[e] <= capacity
    assert not keep.all()  # something overflowed, or the test tests nothing
    torch.testing.assert_close(m(x).view(16, D), naive_moe(m, x_TD, keep), rtol=1e-5, atol=1e-5)


def test_bias_changes_selection_not_weights():
    scores = torch.rand(6, E, generator=torch.Generator().manual_seed(4))
    bias = torch.zeros(E)
    bias[5] = 10.0  # every token must now pick expert 5
    idx, w = route(scores, bias, top_k=2, norm_topk_prob=False)
    assert (idx == 5).any(dim=1).all()
    torch.testing.assert_close(w, scores.gather(1, idx))  # weights are the unbiased scores
    idx_n, w_n = route(scores, bias, top_k=2, norm_topk_prob=True)
    torch.testing.assert_close(w_n, scores.gather(1, idx_n) / scores.gather(1, idx_n).sum(1, keepdim=True))


def test_group_limited_routing_matches_naive():
    g = torch.Generator().manual_seed(5)
    scores, bias = torch.rand(20, 16, generator=g), torch.randn(16, generator=g) * 0.1
    n_group, topk_group, top_k = 4, 2, 3
    idx, w = route(scores, bias, top_k, n_group, topk_group, norm_topk_prob=True)
    for t in range(20):
        c = (scores[t] + bias).tolist()
        groups = [sum(sorted(c[4 * gi : 4 * gi + 4], reverse=True)[:2]) for gi in range(4)]
        best = sorted(range(4), key=lambda gi: -groups[gi])[:topk_group]
        allowed = [e for e in range(16) if e // 4 in best]
        chosen = sorted(allowed, key=lambda e: -c[e])[:top_k]
        assert sorted(idx[t].tolist()) == sorted(chosen)
        ws = scores[t, chosen] / scores[t, chosen].sum()
        torch.testing.assert_close(sorted(w[t].tolist()), sorted(ws.tolist()))


def test_update_bias_sign_rule_and_accumulation():
    m = make_moe(bias_update_rate=0.01)
    m.train()
    x = torch.randn(2, 8, D, generator=torch.Generator().manual_seed(6))
    m(x)
    first = m.tokens_per_expert.clone()
    m(x)  # a second micro-batch adds up
    torch.testing.assert_close(m.tokens_per_expert, 2 * first)
    assert m.tokens_per_expert.sum() == 2 * 16 * 2
    counts = torch.tensor([10.0, 0, 4, 4, 4, 4, 4, 2])  # mean 4: over, under, equal
    m.update_bias(counts)
    assert m.router.expert_bias.tolist() == pytest.approx([-0.01, 0.01, 0, 0, 0, 0, 0, 0.01])
    assert (m.tokens_per_expert == 0).all()
    m.eval()
    m(x)  # eval forwards are not counted
    assert (m.tokens_per_expert == 0).all()
    m.train()
    m(x)
    own = m.tokens_per_expert.clone()
    before = m.router.expert_bias.clone()
    m.update_bias()  # from its own buffer
    torch.testing.assert_close(m.router.expert_bias - before, 0.01 * torch.sign(own.mean() - own))
    frozen = make_moe(aux_loss_free=False)
    frozen.update_bias(counts)
    assert (frozen.router.expert_bias == 0).all()


def test_aux_losses_finite_with_router_grads_and_match_definitions():
    m = make_moe(seq_aux_loss_coef=0.1, aux_loss_coef=0.01)
    x = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(7))
    m(x)
    assert m.aux_loss.dim() == 0 and torch.isfinite(m.aux_loss)
    (g,) = torch.autograd.grad(m.aux_loss, m.router.weight)
    assert g.abs().sum() > 0
    scores = torch.sigmoid(x.view(21, D) @ m.router.weight.T).detach()
    idx, _ = route(scores, m.router.expert_bias, 2)
    ref_seq = 0.0
    for b in range(3):
        s, i = scores[b * 7 : (b + 1) * 7], idx[b * 7 : (b + 1) * 7]
        f = torch.stack([(i == e).sum() for e in range(E)]).float() * E / (2 * 7)
        p = (s / s.sum(1, keepdim=True)).mean(0)
        ref_seq += (f * p).sum() / 3
    torch.testing.assert_close(seq_aux_loss(scores, idx, 3), ref_seq)
    f = torch.stack([(idx == e).sum() for e in range(E)]).float() / idx.numel()
    ref_sw = E * (f * (scores / scores.sum(1, keepdim=True)).mean(0)).sum()
    torch.testing.assert_close(switch_aux_loss(scores, idx), ref_sw)
    uniform = torch.full((4, E), 0.5)
    assert float(switch_aux_loss(uniform, torch.arange(8).view(4, 2))) == pytest.approx(1.0)
    off = make_moe()
    off(x)
    assert off.aux_loss.dim() == 0 and float(off.aux_loss) == 0.0


def test_routing_stats():
    m = make_moe()
    counts = torch.tensor([4.0, 4, 4, 4, 4, 4, 4, 12])
    st = m.routing_stats(counts)
    assert st["tokens_per_expert"] == counts.tolist()
    assert st["max_load"] == pytest.approx(12 / 5)
    assert st["load_cv"] == pytest.approx(float(counts.std(unbiased=False) / 5))
    m.train()
    x = torch.randn(2, 8, D, generator=torch.Generator().manual_seed(8))
    m(x)
    st = m.routing_stats()
    assert sum(st["tokens_per_expert"]) == 32
    p = torch.sigmoid(x.view(16, D) @ m.router.weight.T).detach()
    p = p / p.sum(1, keepdim=True)
    assert st["router_entropy"] == pytest.approx(float(-(p * p.log()).sum(1).mean()), rel=1e-5)
    assert 0 < st["router_entropy"] <= math.log(E) + 1e-6
    m.update_bias()  # after an update the stats report what it consumed
    assert sum(m.routing_stats()["tokens_per_expert"]) == 32


def test_dispatcher_is_a_replaceable_seam():
    m = make_moe()
    calls = []

    class Spy(LocalDispatcher):
        def __call__(self, x_TD, topk_idx_TK, topk_w_TK, experts):
            calls.append(topk_idx_TK.shape)
            return super().__call__(x_TD, topk_idx_TK, topk_w_TK, experts)

    x = torch.randn(1, 4, D)
    ref = m(x)
    m.dispatcher = Spy()
    torch.testing.assert_close(m(x), ref)
    assert calls == [(4, 2)]


def test_softmax_scoring_and_no_shared_experts():
    m = make_moe(score_func="softmax", n_shared_experts=0, norm_topk_prob=False)
    assert m.shared_experts is None
    x = torch.randn(1, 5, D)
    y = m(x).view(5, D)
    probs = (x.view(5, D) @ m.router.weight.T).softmax(-1)
    idx, w = route(probs, None, 2, norm_topk_prob=False)
    ref = torch.stack(
        [
            sum(
                w[t, k] * swiglu(x[0, t], *(getattr(m.experts, n)[idx[t, k]] for n in ("w1", "w3", "w2")))
                for k in range(2)
            )
            for t in range(5)
        ]
    )
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_route_ties_go_to_the_lowest_index():
    """The Triton router's documented rule, on the torch path: equal scores pick the lowest expert (and
    group) index, in descending order of score (torch.topk picked [6, 5, 4] on an all-equal row)."""
    idx, w = route(torch.full((3, 8), 0.5), None, top_k=3)
    assert idx.tolist() == [[0, 1, 2]] * 3
    torch.testing.assert_close(w, torch.full((3, 3), 1 / 3))
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.5, 0.5, 0.9, 0.9]])  # groups of 2: sums 1.4, 1.4, 1.0, 1.8
    assert route(scores, None, 3, n_group=4, topk_group=2)[0].tolist() == [[1, 6, 7]]  # groups 3 and 0
    assert route(scores, None, 3)[0].tolist() == [[1, 3, 6]]


def _saved_row_copies(m: MoE, x: torch.Tensor, n_rows: int) -> int:
    """How many distinct n_rows x D tensors a forward of `m` keeps for backward. The tensors are held while
    counting: a storage saved by a graph piece the forward then drops could be freed and its address
    reused by a later one, which would count once."""
    seen, held = set(), []

    def pack(t):
        if t.dim() >= 2 and t.shape[-1] == D and t.numel() == n_rows * D:
            seen.add(t.untyped_storage().data_ptr())
            held.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(x)
    return len(seen)


def test_routed_rows_are_kept_once_each():
    """Backward needs the gathered inputs (the up projections' weight grads), one N x D copy. Weighting the
    expert outputs kept them too (topk_w's grad), and index_copy in the un-permute a third (its `source`);
    the experts now weight the F-wide SwiGLU product instead."""
    m = make_moe()
    x = torch.randn(2, 5, D, requires_grad=True)
    assert _saved_row_copies(m, x, n_rows=2 * 5 * m.top_k) == 1


def test_weighting_before_the_down_projection_matches_weighting_its_output():
    """LocalDispatcher scales each row's SwiGLU product h by its routing weight; the reference scales the
    expert outputs (unpermute). Same outputs and gradients (x, expert weights, topk_w), fp32."""
    from kimi.model.moe import gather_rows, unpermute

    m = make_moe()
    g = torch.Generator().manual_seed(3)
    x_TD = torch.randn(10, D, generator=g)
    idx_TK = torch.randint(0, E, (10, 2), generator=g)
    w_TK = torch.rand(10, 2, generator=g)
    g_TD = torch.randn(10, D, generator=g)  # a different gradient per token: a mixed-up row order shows

    def run(fast: bool):
        m.zero_grad()
        x, w = x_TD.clone().requires_grad_(), w_TK.clone().requires_grad_()
        if fast:
            y = LocalDispatcher()(x, idx_TK, w, m.experts)
        else:
            sort_idx_N, counts_E = permute(idx_TK, E)
            y = unpermute(m.experts(gather_rows(x, sort_idx_N, 2), counts_E), sort_idx_N, w)
        (y * g_TD).sum().backward()
        return [y, x.grad, w.grad] + [p.grad for p in m.experts.parameters()]

    for a, b in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_combine_on_cpu_matches_the_scatter_path():
    """combine's CPU index_add (own backward) against combine_by_scatter, the path off CPU: values and
    gradients, with rows in a shuffled expert order and a different gradient per token."""
    from kimi.model.moe import combine, combine_by_scatter

    g = torch.Generator().manual_seed(4)
    T, K = 6, 3
    sort_idx_N = torch.randperm(T * K, generator=g)
    y_ND, g_TD = torch.randn(T * K, D, generator=g), torch.randn(T, D, generator=g)
    outs = []
    for fn in (combine, combine_by_scatter):
        y = y_ND.clone().requires_grad_()
        out = fn(y, sort_idx_N, K)
        (out * g_TD).sum().backward()
        outs.append((out, y.grad))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
