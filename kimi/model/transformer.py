"""The Kimi-K2-style decoder: embed -> [pre-norm attention, pre-norm FFN (MoE or dense)] x L -> norm -> head.

Single-device code. Parallelism (FSDP, expert parallelism, compile, checkpointing) is applied from
outside through the module tree; the MoE's `dispatcher` is the seam for expert parallelism.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kimi.config import KimiConfig
from kimi.model.attention import MHA, MLA
from kimi.model.cache import KVCache
from kimi.model.layers import MLP, GeluMLP, RMSNorm, make_norm, rope_cos_sin
from kimi.model.loss import LMHead
from kimi.model.moe import GroupedExperts, MoE
from kimi.model.router import Router


class ModelOutput(NamedTuple):
    logits: torch.Tensor | None  # (B, T, vocab); None with targets when model.loss_chunk_tokens > 0
    loss: torch.Tensor | None  # ce_loss + aux_loss: what training backpropagates
    ce_loss: torch.Tensor | None  # mean cross entropy over targets != -1
    aux_loss: torch.Tensor | None  # sum of the MoE layers' balance losses (0 when off)


class Block(nn.Module):
    def __init__(self, cfg: KimiConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = make_norm(cfg.norm, cfg.n_embd, cfg.rms_norm_eps)
        attn_cls = MLA if cfg.attention.type == "mla" else MHA
        self.attn = attn_cls(cfg.n_embd, cfg.n_head, cfg.attention)
        self.ffn_norm = make_norm(cfg.norm, cfg.n_embd, cfg.rms_norm_eps)
        dense_cls = GeluMLP if cfg.mlp == "gelu" else MLP
        self.ffn = (
            MoE(cfg.n_embd, cfg.moe) if cfg.is_moe_layer(layer_idx) else dense_cls(cfg.n_embd, cfg.intermediate_size)
        )

    def forward(self, x_BTD, cos_TR, sin_TR, cache=None, start_pos: int = 0):
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos_TR, sin_TR, cache, start_pos)
        return x_BTD + self.ffn(self.ffn_norm(x_BTD))


class KimiModel(nn.Module):
    """forward(idx_BT, targets_BT=None, *, cache=None, start_pos=0) -> ModelOutput.

    With a cache (from `new_cache`), positions start_pos..start_pos+T-1 are appended and attended
    together with everything before them; T may be a whole prompt (prefill) or one token (decode).
    """

    def __init__(self, config: KimiConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        if config.pos_emb == "learned":  # GPT-2's position table (the baseline); K2 uses RoPE inside attention
            self.embed_positions = nn.Embedding(config.block_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = make_norm(config.norm, config.n_embd, config.rms_norm_eps)
        self.lm_head = LMHead(config.n_embd, config.vocab_size, config.loss_chunk_tokens)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.init_weights()

    # ------------------------------------------------------------------ init

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter and buffer: normal(init_std), with the matrices that write into
        the residual stream (o_proj, down projections) scaled by 1/sqrt(2 * n_layer) as in GPT-2, norms
        at 1, routing bias and statistics at 0. Call after `to_empty()` when the model was built on meta."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                residual_out = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(module.weight, std=out_std if residual_out else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, (RMSNorm, nn.LayerNorm)):
                module.reset_parameters()
            elif isinstance(module, GroupedExperts):
                nn.init.normal_(module.w1, std=std)
                nn.init.normal_(module.w3, std=std)
                nn.init.normal_(module.w2, std=out_std)
            elif isinstance(module, Router):
                nn.init.normal_(module.weight, std=std)
                module.expert_bias.zero_()
            elif isinstance(module, MoE):
                module.tokens_per_expert.zero_()
                module._entropy_sum.zero_()
            elif isinstance(module, (MLA, MHA)):
                module.max_logits_H.zero_()

    # ------------------------------------------------------------------ forward

    def forward(self, idx_BT, targets_BT=None, *, cache: KVCache | None = None, start_pos: int = 0) -> ModelOutput:
        if idx_BT.dim() != 2:
            raise ValueError(f"idx must be (batch, time) token ids, got shape {tuple(idx_BT.shape)}")
        B, T = idx_BT.shape
        self._check_inputs(idx_BT, targets_BT, start_pos)
        if cache is not None:
            cache.check(B, start_pos, T)
        x_BTD = self.embed_tokens(idx_BT)
        positions_T = torch.arange(start_pos, start_pos + T, device=idx_BT.device)
        if self.config.pos_emb == "learned":
            x_BTD = x_BTD + self.embed_positions(positions_T)
            cos_TR = sin_TR = None  # MHA then skips RoPE
        else:
            a = self.config.attention
            cos_TR, sin_TR = rope_cos_sin(positions_T, self.layers[0].attn.rope_dim, a.rope_theta, a.rope_scaling)
        for i, layer in enumerate(self.layers):
            x_BTD = layer(x_BTD, cos_TR, sin_TR, None if cache is None else cache.layers[i], start_pos)
        h_BTD = self.norm(x_BTD)
        if targets_BT is None:
            return ModelOutput(self.lm_head(h_BTD), None, None, None)
        if self.config.loss_chunk_tokens:  # the logits only chunk by chunk, inside the head (kimi/model/loss.py)
            logits, ce = None, self.lm_head(h_BTD.reshape(B * T, -1), targets_BT.reshape(-1))
        else:
            logits = self.lm_head(h_BTD)
            ce = F.cross_entropy(logits.float().view(B * T, -1), targets_BT.reshape(-1), ignore_index=-1)
        aux = sum((m.aux_loss for m in self.moe_layers()), ce.new_zeros((), dtype=torch.float32))
        return ModelOutput(logits, ce + aux, ce, aux)

    def _check_inputs(self, idx_BT, targets_BT, start_pos: int) -> None:
        T, V = idx_BT.shape[1], self.config.vocab_size
        if start_pos < 0 or start_pos + T > self.config.block_size:
            raise ValueError(
                f"positions {start_pos}..{start_pos + T - 1} exceed model.block_size={self.config.block_size}; "
                "shorten the input or use a model with a larger block_size"
            )
        if idx_BT.numel() == 0:
            return
        checks = [idx_BT.min(), idx_BT.max()]
        if targets_BT is not None:
            checks += [targets_BT.min(), targets_BT.max()]
        lo, hi, *t = torch.stack(checks).tolist()  # one host sync
        if lo < 0 or hi >= V:
            raise ValueError(f"token ids must be in [0, {V}) (model.vocab_size), got values in [{lo}, {hi}]")
        if t and (t[0] < -1 or t[1] >= V):
            raise ValueError(f"targets must be in [0, {V}) or -1 (ignored), got values in [{t[0]}, {t[1]}]")

    # ------------------------------------------------------------------ helpers

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> KVCache:
        if max_len > self.config.block_size:
            raise ValueError(f"cache max_len={max_len} exceeds model.block_size={self.config.block_size}")
        p = self.embed_tokens.weight
        device = p.device if device is None else device
        dtype = p.dtype if dtype is None else dtype
        layers = [b.attn.new_layer_cache(batch_size, max_len, device, dtype) for b in self.layers]
        return KVCache(layers, batch_size, max_len)

    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.layers if isinstance(b.ffn, MoE)]

    def attention_layers(self) -> list[nn.Module]:
        return [b.attn for b in self.layers]

    # ------------------------------------------------------------------ counting

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters (a tied embedding counted once). non_embedding drops embed_tokens, embed_positions
        (as nanoGPT's count drops wpe) and lm_head."""
        seen, n = set(), 0
        for name, p in self.named_parameters():
            if id(p) in seen or (non_embedding and name.startswith(("embed_", "lm_head"))):
                continue
            seen.add(id(p))
            n += p.numel()
        return n

    def num_active_params(self, non_embedding: bool = False) -> int:
        """Parameters used per token: routed experts count top_k of num_experts."""
        n = self.num_params(non_embedding)
        for m in self.moe_layers():
            routed = sum(p.numel() for p in m.experts.parameters())
            n -= routed - routed * m.top_k // m.num_experts
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6 * (active matmul params, incl. lm_head but not the embedding
        lookup) + per layer 6 * H * (qk_dim + v_dim) * seq_len for QK^T and AV (PaLM appendix B
        convention: the causal mask's halving is not subtracted)."""
        seq_len = seq_len or self.config.block_size
        matmul = self.num_active_params(non_embedding=True) + self.lm_head.weight.numel()
        attn = 0
        for a in self.attention_layers():
            qk, v = (a.nope + a.rope, a.v_dim) if isinstance(a, MLA) else (a.head_dim, a.head_dim)
            attn += 6 * a.n_head * (qk + v) * seq_len
        return 6 * matmul + attn

    def kv_cache_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Inference cache bytes per token per sequence, summed over layers."""
        size = torch.empty((), dtype=dtype).element_size()
        cfg = self.config
        per_layer = cfg.attention.kv_lora_rank + cfg.attention.qk_rope_head_dim
        if cfg.attention.type == "mha":
            per_layer = 2 * cfg.n_embd
        return per_layer * cfg.n_layer * size
