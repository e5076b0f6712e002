"""DeepSeek's block FP8 (Kimi-K2, DeepSeek-V3 checkpoints): e4m3 weights with one float32 `weight_scale_inv`
per block[0] x block[1] tile, the weight being `fp8 * scale_inv`. Pure functions; kimi/checkpoint/hf.py
reads and writes the files.
"""

from __future__ import annotations

import torch

SCALE = "_scale_inv"  # DeepSeek FP8: `x.weight` has `x.weight_scale_inv`
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
E4M3_MAX = 448.0  # largest finite float8_e4m3fn


def _tile_scales(scale: torch.Tensor, i: int, block: tuple[int, int], cols: int) -> torch.Tensor:
    """Row i of the tile scales spread over the columns: (..., cols)."""
    return scale[..., i, :].repeat_interleave(block[1], dim=-1)[..., :cols]


def dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype, name: str):
    """w * scale_inv, each scale covering one block[0] x block[1] tile of the last two dims; the tiles at
    the bottom and right edges are partial when a dim is not a multiple of the block. One row of tiles at
    a time, so the only full-size temporary is the float32 result."""
    rows, cols = w.shape[-2:] if w.dim() >= 2 else (0, 0)
    want = (*w.shape[:-2], -(-rows // block[0]), -(-cols // block[1]))
    if w.dim() < 2 or tuple(scale_inv.shape) != want:
        raise ValueError(
            f"'{name}{SCALE}' has shape {tuple(scale_inv.shape)} but '{name}' {tuple(w.shape)} in "
            f"{list(block)} blocks needs {want}; check weight_block_size in config.json"
        )
    out = w.to(torch.float32)  # FP8 has no CPU multiply
    scale = scale_inv.to(torch.float32)
    for i in range(want[-2]):
        out[..., i * block[0] : (i + 1) * block[0], :].mul_(_tile_scales(scale, i, block, cols).unsqueeze(-2))
    return out.to(dtype)


def quantize_fp8(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, float32 scale_inv) as DeepSeek stores them: each tile scaled so its largest magnitude
    lands on 448, e4m3's largest finite value (an all-zero tile gets scale 1). The inverse of dequantize_fp8
    up to e4m3's rounding (3 mantissa bits: <= 2^-4 relative for normal values)."""
    rows, cols = w.shape[-2:]
    n_r, n_c = -(-rows // block[0]), -(-cols // block[1])
    w32 = w.float()
    pad = torch.nn.functional.pad(w32.abs(), (0, n_c * block[1] - cols, 0, n_r * block[0] - rows))
    amax = pad.unflatten(-1, (n_c, block[1])).unflatten(-3, (n_r, block[0])).amax(dim=(-3, -1))  # (..., n_r, n_c)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    for i in range(n_r):
        rs = slice(i * block[0], (i + 1) * block[0])
        q[..., rs, :] = (w32[..., rs, :] / _tile_scales(scale, i, block, cols).unsqueeze(-2)).to(torch.float8_e4m3fn)
    return q, scale
