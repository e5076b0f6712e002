"""python -m kimi.bench kernels: the Triton routing kernels (kimi.kernels) against torch, fwd+bwd, one GPU.

For T in {4k, 16k, 64k} tokens and E in {8, 64, 384} experts it times, with triton.testing.do_bench
(median ms of one forward + backward):
  router   fused_route | the kernel's torch reference, eager | that reference under torch.compile |
           the model's own torch path (Router.scores + route + expert_counts), eager
  permute  permute + gather_rows + unpermute (experts left out: identity) | the model's torch steps,
           eager | the same under torch.compile
"x eager" is the speed-up over the model's eager torch path (router: its own column; permute: the eager
column), "x comp" over the compiled reference.
Targets (issue 10): router >= 2x eager and no slower than compiled; permute+unpermute >= 1.5x eager.
Without a GPU it prints "needs a GPU" and exits 0: the interpreter says nothing about speed.
"""

from __future__ import annotations

import torch

# (E, K, n_group, topk_group): Mixtral-like, DeepSeek-V3-like groups, Kimi K2 (384 experts, top-8)
SHAPES = [(8, 2, 1, 1), (64, 6, 8, 4), (384, 8, 1, 1)]
TOKENS = [4096, 16384, 65536]
D = 1024  # model dim for the permute benchmark (bf16 rows)
DEVICE = "cuda"


def _model_route(logits_TE, bias_E, K, score_func, n_group, topk_group, norm, scale):
    from kimi.model.router import expert_counts, route

    scores_TE = logits_TE.float().sigmoid() if score_func == "sigmoid" else logits_TE.float().softmax(-1)
    idx_TK, w_TK = route(scores_TE, bias_E, K, n_group, topk_group, norm)
    return w_TK * scale, idx_TK, expert_counts(idx_TK.reshape(-1), bias_E.shape[0])


def _torch_dispatch(x_TD, idx_TK, w_TK, E):
    from kimi.model.moe import gather_rows, permute, unpermute

    sort_idx_N, _ = permute(idx_TK, E)
    return unpermute(gather_rows(x_TD, sort_idx_N, idx_TK.shape[1]), sort_idx_N, w_TK)


def _triton_dispatch(x_TD, idx_TK, w_TK, E):
    import kimi.kernels as kk

    plan, _ = kk.permute(idx_TK, E)
    return kk.unpermute(kk.gather_rows(x_TD, plan, idx_TK.shape[1]), plan, w_TK)


def _fwd_bwd(fn, args, inputs, g):
    """One forward of fn(*args) and the backward of its (first) output into `inputs`."""

    def step():
        out = fn(*args)
        out = out[0] if isinstance(out, tuple) else out
        torch.autograd.grad(out, inputs, g)

    return step


def run() -> None:
    if not torch.cuda.is_available():
        print("kimi.bench kernels: needs a GPU (CUDA); nothing measured")
        return
    import triton
    from triton.testing import do_bench

    import kimi.kernels as kk

    dev = DEVICE
    print(
        f"kimi.bench kernels on {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}"
    )
    print("median ms per fwd+bwd; x eager: Triton's speed-up over the model's eager torch path, x comp: over compiled")
    head = f"{'case':<34}{'triton':>9}{'eager ref':>11}{'compiled':>11}{'model eager':>13}{'x eager':>9}{'x comp':>8}"
    print(head + "\n" + "-" * len(head))
    ref_c = torch.compile(kk.route_reference, dynamic=False)
    for E, K, G, TG in SHAPES:
        for T in TOKENS:
            torch._dynamo.reset()
            logits = torch.randn(T, E, device=dev, requires_grad=True)
            bias = torch.randn(E, device=dev) * 0.01
            g = torch.randn(T, K, device=dev)
            args = (bias, K, "sigmoid", G, TG, True, 2.827)
            ms = [
                do_bench(_fwd_bwd(f, (logits, *args), [logits], g))
                for f in (kk.fused_route, kk.route_reference, ref_c, _model_route)
            ]
            name = f"router T={T} E={E} K={K} G={G}"
            print(
                f"{name:<34}{ms[0]:>9.3f}{ms[1]:>11.3f}{ms[2]:>11.3f}{ms[3]:>13.3f}{ms[3] / ms[0]:>9.2f}{ms[2] / ms[0]:>8.2f}"
            )
    torch_c = torch.compile(_torch_dispatch, dynamic=False)
    for E, K, _, _ in SHAPES:
        for T in TOKENS:
            torch._dynamo.reset()
            x = torch.randn(T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
            w = torch.rand(T, K, device=dev, requires_grad=True)
            idx = torch.rand(T, E, device=dev).topk(K, dim=-1).indices
            g = torch.randn(T, D, device=dev)
            ms = [
                do_bench(_fwd_bwd(f, (x, idx, w, E), [x, w], g)) for f in (_triton_dispatch, _torch_dispatch, torch_c)
            ]
            name = f"permute+unpermute T={T} E={E} K={K}"
            print(
                f"{name:<34}{ms[0]:>9.3f}{ms[1]:>11.3f}{ms[2]:>11.3f}{'':>13}{ms[1] / ms[0]:>9.2f}{ms[2] / ms[0]:>8.2f}"
            )
