"""kimi.kernels (Triton) against their plain-torch references, and the model's torch vs Triton paths.

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so shapes are
small and blocks large. Tolerances: routing decisions, counts and permutations exact; fp32 weights and
gradients 1e-6 / 1e-5 (sigmoid/softmax may differ from torch's in the last bit); un-permute sums in the
same order as the reference, exact at K <= 2.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kimi.kernels as kernels  # always imports; HAS_TRITON says whether the kernels exist

if not kernels.HAS_TRITON:
    pytest.skip("triton is not installed (pip install -e '.[dev]')", allow_module_level=True)

from kimi.config import ConfigError, MoEConfig  # noqa: E402
from kimi.model.kernel_choice import kernel_module  # noqa: E402
from kimi.model.moe import GroupedExperts, MoE, grouped_swiglu, looped_swiglu, permute  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
# On a GPU machine the same tests run the compiled kernels on CUDA tensors (inputs are drawn on the CPU, then moved).
DEV = "cuda" if torch.cuda.is_available() else "cpu"

# (T, E, K, score_func, n_group, topk_group, norm, scale, block_t): T = 0, T not a multiple of the block
# (block_t 16 -> several programs), E not a power of 2 (padded columns), groups of 1 expert, softmax.
ROUTE_CASES = [
    (0, 8, 2, "sigmoid", 1, 1, True, 1.0, None),
    (37, 8, 2, "sigmoid", 1, 1, True, 1.0, 16),
    (50, 12, 3, "softmax", 3, 2, False, 2.5, None),
    (45, 16, 4, "sigmoid", 4, 2, True, 2.827, 16),
    (20, 6, 2, "softmax", 6, 3, True, 1.0, None),
]


def _grads(fn, logits, g):
    logits = logits.detach().requires_grad_()
    w, idx, counts = fn(logits)
    (grad,) = torch.autograd.grad((w * g).sum(), logits)
    return w, idx, counts, grad


@pytest.mark.parametrize("case", ROUTE_CASES, ids=lambda c: f"T{c[0]}-E{c[1]}-K{c[2]}-{c[3]}-G{c[4]}")
def test_fused_route_matches_reference(case):
    T, E, K, score_func, n_group, topk_group, norm, scale, block_t = case
    gen = torch.Generator().manual_seed(T + E)
    logits = torch.randn(T, E, generator=gen).to(DEV)
    bias = torch.randn(E, generator=gen).to(DEV) * 0.1
    bias[-1] = -10.0  # an expert that gets no tokens
    g = torch.randn(T, K, generator=gen).to(DEV)
    args = (K, score_func, n_group, topk_group, norm, scale)
    w, idx, counts, grad = _grads(lambda x: kernels.fused_route(x, bias, *args, block_t=block_t), logits, g)
    w_ref, idx_ref, counts_ref, grad_ref = _grads(lambda x: kernels.route_reference(x, bias, *args), logits, g)
    assert torch.equal(idx, idx_ref)
    assert torch.equal(counts, counts_ref) and int(counts.sum()) == T * K and counts[-1] == 0
    torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-6)


def test_fused_route_ties_and_low_precision_logits():
    """Ties: lowest expert (and group) index wins, in kernel and reference alike. bf16 logits route in fp32."""
    E, K = 8, 3
    logits = torch.zeros(4, E, device=DEV)
    w, idx, counts = kernels.fused_route(logits, None, K, n_group=4, topk_group=2)
    assert idx.tolist() == [[0, 1, 2]] * 4 and counts.tolist() == [4, 4, 4, 0, 0, 0, 0, 0]
    torch.testing.assert_close(w, torch.full((4, K), 1 / 3, device=DEV))
    # many exact ties: logits and bias on a coarse grid
    gen = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 4, (33, 16), generator=gen).to(DEV).float() / 2
    bias = torch.randint(0, 2, (16,), generator=gen).to(DEV).float() / 4
    for group in ((1, 1), (4, 2)):
        out, ref = (
            kernels.fused_route(logits, bias, 4, "sigmoid", *group),
            kernels.route_reference(logits, bias, 4, "sigmoid", *group),
        )
        assert torch.equal(out[1], ref[1]) and torch.equal(out[2], ref[2])
    x16 = torch.randn(9, 16, generator=gen).to(DEV).bfloat16()
    w, idx, _ = kernels.fused_route(x16, bias, 2)
    w_ref, idx_ref, _ = kernels.route_reference(x16.float(), bias, 2)
    assert w.dtype == torch.float32 and torch.equal(idx, idx_ref)
    torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-6)


@pytest.fixture
def small_blocks(monkeypatch):
    """16-row programs: several per launch, the last one partly masked (the interpreter's default is one)."""
    import kimi.kernels.dispatch as mod

    monkeypatch.setattr(mod, "row_block", lambda rows, width: 16)


@pytest.mark.parametrize("T, E, K, align", [(0, 4, 2, 1), (37, 8, 2, 1), (37, 16, 3, 4), (300, 5, 2, 8)])
def test_permute_matches_reference(T, E, K, align, small_blocks):
    gen = torch.Generator().manual_seed(T)
    idx = torch.randint(0, E // 2 + 1, (T, K), generator=gen).to(DEV)  # upper experts get no tokens
    plan, counts = kernels.permute(idx, E, align)
    plan_ref, counts_ref = kernels.permute_reference(idx, E, align)
    assert torch.equal(plan.sort_idx_P, plan_ref.sort_idx_P) and torch.equal(plan.pos_N, plan_ref.pos_N)
    assert torch.equal(counts, counts_ref) and (counts % align == 0).all()
    N = T * K
    assert torch.equal(plan.sort_idx_P[plan.pos_N], torch.arange(N, device=DEV))  # pos is the inverse of the sort
    if align == 1:  # exactly the model's torch permutation (a stable argsort)
        sort_ref, counts_model = permute(idx, E)
        assert torch.equal(plan.sort_idx_P, sort_ref) and torch.equal(counts, counts_model)
    else:
        assert (plan.sort_idx_P == N).sum() == plan.sort_idx_P.numel() - N  # the rest is padding


@pytest.mark.parametrize("T, K, D, align", [(0, 2, 8, 1), (29, 2, 24, 1), (29, 3, 40, 4)])
def test_gather_and_unpermute_match_reference_padding_never_reaches_output(T, K, D, align, small_blocks):
    E = 6
    gen = torch.Generator().manual_seed(T + K)
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]) if T else torch.zeros(0, K).long()
    plan, _ = kernels.permute(idx.to(DEV), E, align)
    x = torch.randn(T, D, generator=gen).to(DEV).requires_grad_()
    w = torch.rand(T, K, generator=gen).to(DEV).requires_grad_()
    g = torch.randn(T, D, generator=gen).to(DEV)
    padding = plan.sort_idx_P == T * K
    results = []
    for gather, unpermute in (
        (kernels.gather_rows, kernels.unpermute),
        (kernels.gather_rows_reference, kernels.unpermute_reference),
    ):
        x_PD = gather(x, plan, K)
        assert (x_PD[padding] == 0).all()
        y_PD = torch.where(padding[:, None], float("nan"), x_PD * 2 + 1)  # NaN in every padding row
        y_TD = unpermute(y_PD, plan, w)
        assert y_TD.dtype == torch.float32 and torch.isfinite(y_TD).all()
        results.append((x_PD, y_TD, *torch.autograd.grad((y_TD * g).sum(), [x, w])))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _moe_pair(**kw):
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=8, top_k=3, expert_hidden=32, seq_aux_loss_coef=0.1, **kw)
    ref = MoE(16, cfg)
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ref.router.expert_bias.copy_(torch.randn(8) * 0.1)
    tri = MoE(16, MoEConfig(**{**vars(cfg), "kernels": "triton"}))
    tri.load_state_dict(ref.state_dict())
    return ref.to(DEV), tri.to(DEV)


@pytest.mark.parametrize(
    "kw",
    [dict(n_group=4, topk_group=2, routed_scaling_factor=2.5), dict(score_func="softmax", capacity_factor=0.6)],
    ids=["groups-scaled", "softmax-capacity"],
)
def test_moe_triton_path_matches_torch_path(kw):
    ref, tri = _moe_pair(**kw)
    assert "triton" in repr(tri.dispatcher)
    x = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(1)).to(DEV).requires_grad_()
    g = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(2)).to(DEV)
    outs = []
    for m in (ref, tri):
        m.train()
        y = m(x)
        params = [x, m.router.weight, m.experts.w1, m.experts.w2, m.shared_experts.gate_proj.weight]
        outs.append((y, *torch.autograd.grad((y * g).sum() + m.aux_loss, params), m.tokens_per_expert))
    assert torch.equal(outs[0][-1], outs[1][-1])  # same routing decisions, counted the same
    for a, b in zip(outs[0], outs[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_selection_auto_and_errors(monkeypatch):
    dev = torch.device(DEV)
    assert kernel_module("torch", dev) is None
    assert kernel_module("auto", dev) is (kernels if DEV == "cuda" else None)
    assert kernel_module("triton", dev) is kernels  # on CPU: under the interpreter
    with pytest.raises(ConfigError, match="is not one of"):
        MoEConfig(kernels="cuda").validate(2)
    monkeypatch.setitem(sys.modules, "triton", None)  # what `import triton` sees where it is not installed
    with pytest.raises(ConfigError, match="pip install triton"):
        MoEConfig(kernels="triton").validate(2)
    MoEConfig(kernels="auto").validate(2)  # auto falls back to torch
    # ... and through the CLI, as one line; kimi.kernels itself still imports (HAS_TRITON False)
    code = (
        "import sys, runpy; sys.modules['triton'] = None; import kimi.kernels; print('HAS_TRITON', kimi.kernels.HAS_TRITON);"
        "sys.argv = ['kimi.train', '--config', 'configs/debug.yaml', '--moe.kernels=triton', '--dry-run'];"
        "runpy.run_module('kimi.train', run_name='__main__')"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "HAS_TRITON False" in res.stdout
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        "error: moe.kernels=triton needs Triton: pip install triton (or set moe.kernels=torch)"
    )


def test_grouped_mm_fallbacks_match_the_loop(monkeypatch):
    """F.grouped_mm missing -> torch._grouped_mm; both missing -> the per-expert loop. Zero-token experts."""
    gen = torch.Generator().manual_seed(3)
    ex = GroupedExperts(4, 16, 32)
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.3, generator=gen)
    counts = torch.tensor([0, 5, 0, 3])
    x = torch.randn(8, 16, generator=gen)
    ref = looped_swiglu(x, ex.w1, ex.w3, ex.w2, counts)
    monkeypatch.delattr(F, "grouped_mm", raising=False)
    torch.testing.assert_close(grouped_swiglu(x, ex.w1, ex.w3, ex.w2, counts), ref, rtol=1e-5, atol=1e-5)
    monkeypatch.delattr(torch, "_grouped_mm", raising=False)
    torch.testing.assert_close(ex(x, counts), ref)  # grouped_mm_supported says no: the loop runs
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 compute, as training on a GPU runs
        torch.testing.assert_close(ex(x, counts).float(), ref, rtol=3e-2, atol=3e-2)


def test_bench_kernels_says_it_needs_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("on a GPU `python -m kimi.bench kernels` measures; run it by hand")
    from kimi.bench.run import main

    main(["kernels"])  # returns normally: `python -m kimi.bench kernels` exits 0
    assert capsys.readouterr().out.strip() == "kimi.bench kernels: needs a GPU (CUDA); nothing measured"


def _train_losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _train_rank(rank, world, out):
    import torch.distributed as dist

    from kimi.config import load_config
    from kimi.parallel.expert_parallel import AllToAllDispatcher
    from kimi.train import train
    from tests.unit.test_expert_parallel import ROUTINGS, check_routings

    check_routings(dist.group.WORLD, ROUTINGS[2], lambda group, E: AllToAllDispatcher(group, E, "triton"))
    overrides = [f"--train.out_dir={out}", "--logging.mlflow=false", "--train.eval_interval=0"]
    train(load_config(ROOT / "configs" / "debug.yaml", [*overrides, "--moe.kernels=triton", "--parallel.ep=2"]))


@pytest.mark.skipif(DEV == "cuda", reason="the golden losses are CPU fp32, and EP here is gloo on CPU")
def test_debug_training_with_triton_kernels_matches_golden(tmp_path):
    """20 debug steps with moe.kernels=triton, one process and EP=2 on 2 ranks, against the torch path's
    golden losses (rtol 1e-4, as test_train_dist; measured ~1e-7). The EP ranks first run the all-to-all
    dispatcher's hand-built routings with the Triton permute steps against the single-process reference."""
    from kimi.config import load_config
    from kimi.train import train
    from tests.dist_utils import run_distributed

    golden = json.loads((ROOT / "tests" / "golden" / "debug_losses.json").read_text())["losses"]
    overrides = [f"--train.out_dir={tmp_path / 'one'}", "--logging.mlflow=false", "--train.eval_interval=0"]
    train(load_config(ROOT / "configs" / "debug.yaml", [*overrides, "--moe.kernels=triton"]))
    run_distributed(_train_rank, 2, args=(str(tmp_path / "ep2"),), timeout=600)
    for run in ("one", "ep2"):
        losses = _train_losses(tmp_path / run)
        assert len(losses) == len(golden)
        for step, (a, b) in enumerate(zip(losses, golden), 1):
            assert abs(a - b) <= 1e-4 * b, f"{run} step {step}: {a} vs golden {b}"


@pytest.mark.parametrize("group", [(1, 1), (4, 2)], ids=["flat", "groups"])
@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_fused_route_nan_rows_pick_real_experts(score_func, group):
    """A NaN token (train.nonfinite=skip must survive it) routes to real experts, as the reference does:
    NaN counts as the largest value (torch.sort's order), lowest index first. An all-NaN row used to get
    expert id E_PAD, one that does not exist, and crashed the permute."""
    E, K = 8, 3
    logits = torch.randn(6, E, generator=torch.Generator().manual_seed(0))
    logits[1] = float("nan")  # a whole NaN token
    logits[3, [2, 5]] = float("nan")  # NaN in a few experts only
    logits[4, 0] = float("inf")
    logits = logits.to(DEV)
    args = (K, score_func, *group)
    w, idx, counts = kernels.fused_route(logits, None, *args)
    _, idx_ref, counts_ref = kernels.route_reference(logits, None, *args)
    assert int(idx.min()) >= 0 and int(idx.max()) < E, idx
    assert torch.equal(idx, idx_ref) and torch.equal(counts, counts_ref)
    assert w[1].isnan().all()  # the NaN still reaches the loss, which the trainer's check then skips


@pytest.mark.parametrize("group", [(1, 1), (4, 2)], ids=["flat", "groups"])
def test_model_route_breaks_ties_like_the_kernel(group):
    """moe.kernels may change on resume as "the same math", so the model's torch route() must choose what
    the fused router chooses on ties too (lowest expert and group index), in the same order. Coarse-grid
    logits and biases make ties common; topk's unspecified order once changed the set of 20 tokens in 64."""
    from kimi.model.router import route

    gen = torch.Generator().manual_seed(0)
    logits = (torch.randint(0, 4, (64, 16), generator=gen).float() / 2).to(DEV)
    bias = (torch.randint(0, 2, (16,), generator=gen).float() / 4).to(DEV)
    for b in (None, bias):
        w, idx, _ = kernels.fused_route(logits, b, 4, "sigmoid", *group)
        idx_torch, w_torch = route(logits.sigmoid(), b, 4, *group)
        assert torch.equal(idx_torch, idx)
        torch.testing.assert_close(w_torch, w, rtol=1e-6, atol=1e-6)
