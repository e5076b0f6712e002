"""The block's elementwise chains, as plain functions a module calls through its `elementwise` attribute.

Each is a short chain of elementwise ops (RMSNorm's square, mean, rsqrt, scale; SwiGLU's silu and product;
a routed row's weight). Eager torch runs every op as its own pass over memory; on a CPU, where these
tensors do not fit in cache, those passes are a large share of a small model's step. `ELEMENTWISE` holds
the eager versions, which are the reference and the default. kimi.parallel's `apply_fused_elementwise`
(train.fused_elementwise) swaps in torch.compile'd copies of the same functions, one fused kernel each
way, and leaves every matmul in eager torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight_D: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / rms(x) over the last dim, in fp32 and cast back (the HF DeepSeek-V3 order)."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight_D * x32.to(dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: SwiGLU's product, the input of its down projection."""
    return F.silu(gate) * up


def weight_rows(h_NF: torch.Tensor, w_N: torch.Tensor) -> torch.Tensor:
    """h_NF scaled row-wise by w_N (each routed row by its routing weight), multiplied in fp32 and rounded once
    to h's dtype."""
    return (h_NF.float() * w_N[:, None].float()).to(h_NF.dtype)


def weighted_swiglu(gate_NF: torch.Tensor, up_NF: torch.Tensor, w_N: torch.Tensor) -> torch.Tensor:
    """swiglu(gate, up) with each routed row scaled by its routing weight: the input of the experts' down
    projection, fused into one kernel when compiled."""
    return weight_rows(swiglu(gate_NF, up_NF), w_N)


class Elementwise(NamedTuple):
    rms_norm: Callable[..., torch.Tensor]
    swiglu: Callable[..., torch.Tensor]
    weighted_swiglu: Callable[..., torch.Tensor]


ELEMENTWISE = Elementwise(rms_norm, swiglu, weighted_swiglu)
