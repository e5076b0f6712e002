"""Inference KV caches: preallocated per-layer buffers addressed by absolute position.

MLA caches only what it needs to rebuild keys and values: the normalised compressed latent
c_kv (kv_lora_rank) and the already-roped shared key k_rope (qk_rope_head_dim), per token. That is
(C + R) numbers per token per layer instead of MHA's 2 * H * head_dim, the point of MLA.

Legend: B batch, S cached positions (max_len), C kv_lora_rank, R rope dims, H heads, Dh head dim.
"""

from __future__ import annotations

import torch


class MLALayerCache:
    def __init__(self, batch_size: int, max_len: int, kv_lora_rank: int, rope_dim: int, device, dtype):
        self.c_kv_BSC = torch.zeros(batch_size, max_len, kv_lora_rank, device=device, dtype=dtype)
        self.k_rope_BSR = torch.zeros(batch_size, max_len, rope_dim, device=device, dtype=dtype)

    def update(self, start_pos: int, c_kv_BTC: torch.Tensor, k_rope_BTR: torch.Tensor):
        """Write positions start_pos..start_pos+T-1; return views of positions 0..start_pos+T-1."""
        B, T, _ = c_kv_BTC.shape
        end = start_pos + T
        self.c_kv_BSC[:B, start_pos:end] = c_kv_BTC.to(self.c_kv_BSC.dtype)
        self.k_rope_BSR[:B, start_pos:end] = k_rope_BTR.to(self.k_rope_BSR.dtype)
        return self.c_kv_BSC[:B, :end], self.k_rope_BSR[:B, :end]

    def bytes_per_token(self) -> int:
        return (self.c_kv_BSC.shape[-1] + self.k_rope_BSR.shape[-1]) * self.c_kv_BSC.element_size()


class MHALayerCache:
    def __init__(self, batch_size: int, max_len: int, n_head: int, head_dim: int, device, dtype):
        self.k_BHSD = torch.zeros(batch_size, n_head, max_len, head_dim, device=device, dtype=dtype)
        self.v_BHSD = torch.zeros(batch_size, n_head, max_len, head_dim, device=device, dtype=dtype)

    def update(self, start_pos: int, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor):
        B, _, T, _ = k_BHTD.shape
        end = start_pos + T
        self.k_BHSD[:B, :, start_pos:end] = k_BHTD.to(self.k_BHSD.dtype)
        self.v_BHSD[:B, :, start_pos:end] = v_BHTD.to(self.v_BHSD.dtype)
        return self.k_BHSD[:B, :, :end], self.v_BHSD[:B, :, :end]

    def bytes_per_token(self) -> int:
        return 2 * self.k_BHSD.shape[1] * self.k_BHSD.shape[-1] * self.k_BHSD.element_size()


class KVCache:
    """One layer cache per transformer block. `model.new_cache(...)` builds it; `forward(idx, cache=...,
    start_pos=p)` fills positions p..p+T-1. Positions are explicit (no hidden cursor), so a caller can
    rewind (e.g. speculative decoding) by simply passing a smaller start_pos."""

    def __init__(self, layers: list, batch_size: int, max_len: int):
        self.layers = layers
        self.batch_size = batch_size
        self.max_len = max_len

    def check(self, batch_size: int, start_pos: int, seq_len: int) -> None:
        if batch_size > self.batch_size:
            raise ValueError(f"batch of {batch_size} sequences exceeds the cache's batch_size={self.batch_size}")
        if start_pos < 0 or start_pos + seq_len > self.max_len:
            raise ValueError(
                f"positions {start_pos}..{start_pos + seq_len - 1} do not fit the cache's max_len={self.max_len}"
            )

    def bytes_per_token(self) -> int:
        """Bytes cached per token, summed over layers (per sequence)."""
        return sum(layer.bytes_per_token() for layer in self.layers)

    def nbytes(self) -> int:
        return self.bytes_per_token() * self.max_len * self.batch_size
