"""moe.kernels -> the torch path or the Triton kernels of kimi.kernels, for tensors on a given device.

kimi.kernels is imported lazily, on the first Triton forward: the torch path never needs Triton, and on
CPU the Triton interpreter flag (TRITON_INTERPRET=1) only has to be set before that first forward.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _import_kernels():
    try:
        import kimi.kernels as kernels
    except ImportError:
        return None
    return kernels if kernels.HAS_TRITON else None


def kernel_module(choice: str, device: torch.device):
    """kimi.kernels when `choice` (moe.kernels) selects the Triton path for tensors on `device`, else None.

    "auto": Triton on CUDA when it imports, else torch. "triton": always; on CPU that means Triton's
    interpreter, which is correct but slow (tests). Errors are one line saying what to do.
    """
    if choice == "torch" or (choice == "auto" and device.type != "cuda"):
        return None
    kernels = _import_kernels()
    if kernels is None:
        if choice == "auto":
            return None
        raise ValueError("moe.kernels=triton needs Triton: pip install triton (or set moe.kernels=torch)")
    if device.type != "cuda" and not kernels.interpreting():
        raise ValueError(
            "moe.kernels=triton on CPU runs only in Triton's interpreter: set TRITON_INTERPRET=1 (slow) "
            "or moe.kernels=torch"
        )
    return kernels
