"""Triton kernels for MoE routing, imported as `kimi.kernels` (the source lives in the top-level `kernels/`
folder; setup.py maps it with package_dir, so it never shadows the unrelated PyPI package `kernels`).

    fused_route        logits -> scores + bias -> group-limited top-k -> weights, counts   (router.py)
    permute            expert ids -> expert-major order (+ optional padding per expert)     (dispatch.py)
    gather_rows        token rows -> expert-major rows, padding rows zero                   (dispatch.py)
    unpermute          expert rows -> per-token weighted sum over K, fp32                   (dispatch.py)

Each comes with a plain PyTorch reference (`*_reference`) and is tested against it under the Triton
interpreter (tests/unit/test_kernels.py); `python -m kimi.bench kernels` times them on a GPU. Depends on torch
and triton only. Triton is optional: without it `HAS_TRITON` is False and nothing else is exported.
On CPU the kernels run only in Triton's interpreter: set TRITON_INTERPRET=1 before importing this package.
"""

try:
    import triton  # noqa: F401
except ImportError:
    HAS_TRITON = False
else:
    HAS_TRITON = True

if HAS_TRITON:
    from .dispatch import (
        Plan,
        gather_rows,
        gather_rows_reference,
        permute,
        permute_reference,
        unpermute,
        unpermute_reference,
    )
    from .router import fused_route, route_reference
    from .utils import interpreting

    __all__ = [
        "HAS_TRITON",
        "Plan",
        "fused_route",
        "gather_rows",
        "gather_rows_reference",
        "interpreting",
        "permute",
        "permute_reference",
        "route_reference",
        "unpermute",
        "unpermute_reference",
    ]
