"""Small building blocks shared by attention, MoE and the transformer: RMSNorm, SwiGLU MLP, RoPE, fp32 regions.

Legend: B batch, T tokens of this forward, H heads, R rotary dims, D model dim, F hidden dim.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from kimi.model.elementwise import ELEMENTWISE

if TYPE_CHECKING:
    from kimi.config import RopeScalingConfig


def fp32_region(device: torch.device):
    """Context in which autocast is off, so code that upcasts with .float() really runs in fp32.

    Under bf16 autocast an explicit `.float()` is not enough: autocast casts the inputs of F.linear,
    matmul and friends back to bf16. Routing and max-logit tracking need fp32 (see router.py and
    attention.py), so they run inside this. A no-op outside autocast (fp32 results are bit-identical)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()  # e.g. the meta device, which has no autocast


class FP32Buffers:
    """Mixin for an nn.Module whose buffers named in `fp32_buffers` stay fp32 through dtype casts.

    `model.bfloat16()` / `.to(torch.bfloat16)` cast every floating buffer (bf16 inference does it, and
    DeepSpeed's bf16 engine before 0.19.2). Routing and QK-clip state would lose what it is for: bf16
    counts are exact only up to 256, a bias above 0.25 moves in 2e-3 steps (the update is 1e-3), a max
    logit rounds by up to 0.4%. Device moves (and `to_empty`) still apply; only the dtype is kept."""

    fp32_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        kept = {name: self._buffers[name] for name in self.fp32_buffers}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:  # cast from the original, not from the rounded copy
                self._buffers[name] = old.to(new.device)
        return self


class RMSNorm(nn.Module):
    """y = w * x / rms(x), computed in fp32 and cast back (the HF DeepSeek-V3 order, for exact parity)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.elementwise = ELEMENTWISE  # kimi.parallel may swap in fused (compiled) versions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.elementwise.rms_norm(x, self.weight, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). The dense FFN, and the fused shared experts of a MoE layer."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.elementwise = ELEMENTWISE  # kimi.parallel may swap in fused (compiled) versions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.elementwise.swiglu(self.gate_proj(x), self.up_proj(x)))


class GeluMLP(nn.Module):
    """GPT-2's MLP: down(gelu(up(x))), exact (erf) GELU as in nanoGPT. The baseline's dense FFN (model.mlp=gelu).
    Named up/down so init_weights scales down_proj like the other residual-writing matrices."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """model.norm: RMSNorm (K2) or a bias-free LayerNorm with eps 1e-5 (nanoGPT's bias=False setting)."""
    return RMSNorm(dim, eps) if kind == "rmsnorm" else nn.LayerNorm(dim, eps=1e-5, bias=False)


# ----------------------------------------------------------------------------- RoPE


def rope_cos_sin(
    positions_T: torch.Tensor, dim: int, theta: float, scaling: RopeScalingConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, dim/2) in fp32 for integer positions; YaRN-scaled when `scaling` says so.

    Computed per forward rather than held in a buffer: it is tiny, and a model built on the meta
    device (then `to_empty`) would otherwise carry garbage tables. Same float32 op order as HF
    DeepSeek-V3 (`inv_freq = 1 / theta**(arange(0, dim, 2)/dim)`) so converted models agree to ~1e-7.
    """
    pos_freqs_R = theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=positions_T.device) / dim)
    if scaling is None or scaling.type == "none":
        inv_freq_R, gain = 1.0 / pos_freqs_R, 1.0
    else:
        inv_freq_R, gain = _yarn_inv_freq(pos_freqs_R, dim, theta, scaling), yarn_rope_gain(scaling)
    freqs_TR = positions_T.float()[:, None] * inv_freq_R[None, :]
    return freqs_TR.cos() * gain, freqs_TR.sin() * gain


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_rope_gain(s: RopeScalingConfig) -> float:
    """YaRN's scale on cos/sin (HF's attention_factor): 1.0 when mscale == mscale_all_dim (Kimi K2, V3)."""
    if s.mscale and s.mscale_all_dim:
        return _yarn_mscale(s.factor, s.mscale) / _yarn_mscale(s.factor, s.mscale_all_dim)
    return _yarn_mscale(s.factor, 1.0)


def yarn_softmax_gain(s: RopeScalingConfig) -> float:
    """DeepSeek-V3's correction of the attention softmax scale under YaRN: mscale(factor, mscale_all_dim)^2."""
    if s.type == "none" or not s.mscale_all_dim:
        return 1.0
    return _yarn_mscale(s.factor, s.mscale_all_dim) ** 2


def _yarn_inv_freq(pos_freqs_R: torch.Tensor, dim: int, theta: float, s: RopeScalingConfig) -> torch.Tensor:
    """YaRN: frequencies that turn more than beta_fast times over the original context are kept, those that
    turn fewer than beta_slow times are divided by `factor`, and a linear ramp blends the ones between."""

    def dim_of(rotations: float) -> float:  # the rope dim whose frequency turns `rotations` times in context
        return dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = max(math.floor(dim_of(s.beta_fast)), 0), min(math.ceil(dim_of(s.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # a one-dim ramp
    ramp_R = ((torch.arange(dim // 2, dtype=torch.float32, device=pos_freqs_R.device) - low) / (high - low)).clamp(0, 1)
    keep_R = 1 - ramp_R  # 1: extrapolate (keep the frequency), 0: interpolate (divide by factor)
    return (1.0 / (s.factor * pos_freqs_R)) * (1 - keep_R) + (1.0 / pos_freqs_R) * keep_R


def apply_rope(
    x: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor, interleave: bool, skip: int = 0
) -> torch.Tensor:
    """Rotate the last dim of x by position, past its first `skip` entries (MLA's q: [nope, rope] per head,
    rotated in one call); x is laid out (B, T, H, dim). The output keeps x's layout.

    interleave=True rotates pairs (x0, x1), (x2, x3), ... (how DeepSeek-V3 checkpoints store the rope
    dims); False rotates (x_i, x_{i+dim/2}) (GPT-NeoX / Llama). HF's DeepSeek-V3 writes interleaved
    pairs out as [rotated firsts, rotated seconds]; keeping them interleaved here is the same attention
    (q and k get the same layout, and q.k sums over the same products) and lets fp32 rotate as one
    complex multiply over the whole head, the skipped pairs by 1 (exact): one elementwise kernel each way
    instead of four multiplies, two adds and a cat, with no split or cat for MLA's q.
    """
    if interleave and _complex_view_ok(x, skip):
        rot_TP = torch.complex(cos_TR.to(x.dtype), sin_TR.to(x.dtype))  # (T, R/2): e^(i pos freq)
        if skip:
            rot_TP = torch.cat([rot_TP.new_ones(rot_TP.shape[0], skip // 2), rot_TP], dim=1)
        x_c = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
        return torch.view_as_real(x_c * rot_TP[:, None, :]).flatten(-2)
    head, x = x[..., :skip], x[..., skip:]
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    cos = cos_TR[:, None, :].to(x.dtype)  # (T, 1, R/2) broadcasts over heads
    sin = sin_TR[:, None, :].to(x.dtype)
    pairs = (x1 * cos - x2 * sin, x2 * cos + x1 * sin)
    out = torch.stack(pairs, dim=-1).flatten(-2) if interleave else torch.cat(pairs, dim=-1)
    return torch.cat([head, out], dim=-1) if skip else out


def _complex_view_ok(x: torch.Tensor, skip: int) -> bool:
    """Whether x's last dim can be viewed as complex pairs: fp32/fp64 (there is no complex bf16), unit
    stride, even strides and offset, and `skip` a whole number of pairs. Not under torch.compile: inductor
    generates no code for complex ops (it warns and runs them eagerly) and fuses the real path anyway."""
    return (
        not torch.compiler.is_compiling()
        and x.dtype in (torch.float32, torch.float64)
        and skip % 2 == 0
        and x.stride(-1) == 1
        and x.storage_offset() % 2 == 0
        and all(s % 2 == 0 for s, n in zip(x.stride()[:-1], x.shape[:-1]) if n > 1)
    )
