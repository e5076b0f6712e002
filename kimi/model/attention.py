"""Attention: MLA (DeepSeek-V3 / Kimi K2) and plain MHA (the nanoGPT-style dense baseline).

Legend: B batch, T query tokens of this forward, S key positions (T in training; cached length when
decoding), D model dim, H heads, n qk_nope_head_dim, R qk_rope_head_dim, v v_head_dim,
C kv_lora_rank, Q q_lora_rank, Dh MHA head dim.

Both modules share one interface, which the trainer and QK-clip code against:
  forward(x_BTD, cos_TR, sin_TR, cache=None, start_pos=0) -> y_BTD
  max_logits_H         fp32 buffer: running max (floored at 0) of each head's pre-softmax logit,
                       recorded in training forwards when attention.track_max_logits
  reset_max_logits()
  qk_clip_scales(gamma_H) -> [(weight, per-row scale)]   the rescale MuonClip applies
  new_layer_cache(batch_size, max_len, device, dtype)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kimi.config import AttentionConfig
from kimi.model.cache import MHALayerCache, MLALayerCache
from kimi.model.layers import FP32Buffers, RMSNorm, apply_rope, fp32_region, yarn_softmax_gain
from kimi.model.recompute import ATTENTION, recompute, recomputing

# DeepSeek-V3 builds its q/kv latent norms with the default eps, whatever config.rms_norm_eps says;
# matching that keeps converted checkpoints exact.
LATENT_NORM_EPS = 1e-6

# Elements of one query-chunk x keys score block in max-logit tracking (~64 MiB in fp32).
_MAX_LOGIT_CHUNK_ELEMS = 1 << 24


@torch.no_grad()
def causal_max_logits(q_BHTd: torch.Tensor, k_BHSd: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-head max of q.k * scale over causally visible (query, key) pairs, queries at the last T positions.

    Chunked over queries so the extra memory is O(B * H * chunk * S), not O(B * H * T * S). This costs
    one more QK^T product (about a third of attention's forward FLOPs): the price of QK-clip.
    The product runs in fp32 with autocast off (autocast would re-cast the .float() inputs to bf16 and
    round the max logit to bf16, ~0.4%, which QK-clip's gamma = tau / max would inherit).
    Past the product, one pass over the scores: the max over the batch comes first, since the causal mask
    is the same for every sequence, and is masked at (H, chunk, S); the scale multiplies the H maxima, not
    the scores (exact: scale > 0 and rounding is monotone, so max(x) * scale == max(x * scale)). Measured
    on the 2-core Xeon, B 32, H 6, T 256, one thread: 56 -> 25 ms a layer, the same values bit for bit.
    """
    with fp32_region(q_BHTd.device):
        B, H, T, _ = q_BHTd.shape
        S = k_BHSd.shape[2]
        offset = S - T  # query t sits at absolute position offset + t
        k = k_BHSd.float()
        chunk = max(1, min(T, _MAX_LOGIT_CHUNK_ELEMS // max(1, B * H * S)))
        out_H = torch.full((H,), float("-inf"), device=q_BHTd.device)
        for t0 in range(0, T, chunk):
            t1 = min(T, t0 + chunk)
            kv_end = offset + t1  # keys past the chunk's last query are masked anyway
            m_Hcs = (q_BHTd[:, :, t0:t1].float() @ k[:, :, :kv_end].transpose(-1, -2)).amax(dim=0)
            q_pos = torch.arange(offset + t0, offset + t1, device=q_BHTd.device)
            k_pos = torch.arange(kv_end, device=q_BHTd.device)
            m_Hcs.masked_fill_(k_pos[None, :] > q_pos[:, None], float("-inf"))
            out_H = torch.maximum(out_H, m_Hcs.amax(dim=(1, 2)))
        return out_H * scale


def attend(q_BHTd, k_BHSd, v_BHSv, scale: float, start_pos: int) -> torch.Tensor:
    """Causal SDPA where query t sits at absolute position start_pos + t and keys at 0..S-1.

    MLA's values are narrower than its queries/keys (v 48 against nope + rope 64 in the bench configs), and
    SDPA's CPU flash kernel wants one head dim for all three: otherwise it falls back to the math path,
    which builds the (T, S) scores and their mask in full. On CPU the values are zero-padded to the
    queries' width and the output's padding sliced off (exact: the padded columns are 0 x weights);
    transformers' flash-attention integration pads MLA's values the same way. Measured on the 2-core Xeon
    VM, fp32, B 32, H 6, T 256: forward + backward 116 ms -> 65 ms a layer. GPUs keep the unpadded call:
    which SDPA kernel CUDA picks for unequal widths, and whether padding pays there, is unmeasured.
    """
    T, S = q_BHTd.shape[2], k_BHSd.shape[2]
    v_dim = v_BHSv.shape[-1]
    if q_BHTd.device.type == "cpu" and q_BHTd.shape[-1] > v_dim:
        v_BHSv = F.pad(v_BHSv, (0, q_BHTd.shape[-1] - v_dim))
    if T == S:
        o_BHTd = F.scaled_dot_product_attention(q_BHTd, k_BHSd, v_BHSv, is_causal=True, scale=scale)
    else:  # SDPA's is_causal aligns top-left when T != S; with a cache we need bottom-right.
        q_pos = torch.arange(start_pos, start_pos + T, device=q_BHTd.device)
        mask_TS = torch.arange(S, device=q_BHTd.device)[None, :] <= q_pos[:, None]
        o_BHTd = F.scaled_dot_product_attention(q_BHTd, k_BHSd, v_BHSv, attn_mask=mask_TS, scale=scale)
    return o_BHTd[..., :v_dim]


class _MaxLogitMixin(FP32Buffers):
    fp32_buffers = ("max_logits_H",)  # fp32 even when the module is cast to bf16

    def _init_max_logits(self, n_head: int, track: bool) -> None:
        self.track_max_logits = track
        self.register_buffer("max_logits_H", torch.zeros(n_head, dtype=torch.float32), persistent=False)

    def _record(self, q_BHTd, k_BHSd) -> None:
        if self.training and self.track_max_logits and not recomputing():  # a recomputed forward saw the same
            m_H = causal_max_logits(q_BHTd, k_BHSd, self.softmax_scale)
            self.max_logits_H.copy_(torch.maximum(self.max_logits_H, m_H))

    def reset_max_logits(self) -> None:
        self.max_logits_H.zero_()


class MLA(_MaxLogitMixin, nn.Module):
    """Multi-head latent attention. Parameter names and row layouts follow HF DeepSeek-V3 so checkpoints
    convert by renaming: q rows per head are [nope, rope]; kv_b_proj rows per head are [k_nope, v];
    kv_a_proj_with_mqa rows are [latent C, shared rope key R].

    Training (and prefill) expands the latent into per-head keys/values and runs SDPA. Decoding from a
    cache uses the absorbed form: kv_b_proj's k part is folded into q and its v part applied after
    attention, so keys/values are never materialised per head (`absorb`: None = only when T == 1).
    With attention.recompute_kv, training keeps the latent, not the expanded keys/values, for backward.
    """

    def __init__(self, dim: int, n_head: int, cfg: AttentionConfig):
        super().__init__()
        self.n_head, self.cfg = n_head, cfg
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.softmax_scale = (self.nope + self.rope) ** -0.5 * yarn_softmax_gain(cfg.rope_scaling)
        self.rope_dim = self.rope
        qk_out = n_head * (self.nope + self.rope)
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(dim, qk_out, bias=False)
        else:
            self.q_a_proj = nn.Linear(dim, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, qk_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(dim, self.kv_lora_rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, n_head * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(n_head * self.v_dim, dim, bias=False)
        self.absorb: bool | None = None
        self._init_max_logits(n_head, cfg.track_max_logits)

    def _q_weight(self) -> nn.Parameter:
        return self.q_proj.weight if self.cfg.q_lora_rank is None else self.q_b_proj.weight

    def forward(self, x_BTD, cos_TR, sin_TR, cache: MLALayerCache | None = None, start_pos: int = 0):
        B, T, _ = x_BTD.shape
        H = self.n_head
        if self.cfg.q_lora_rank is None:
            q = self.q_proj(x_BTD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))
        # q per head is [nope, rope]: rotate its rope dims in place of a split + cat
        q_BTHd = apply_rope(q.view(B, T, H, -1), cos_TR, sin_TR, self.cfg.rope_interleave, skip=self.nope)
        c_kv_BTC, k_rope_BTR = self.kv_a_proj_with_mqa(x_BTD).split([self.kv_lora_rank, self.rope], dim=-1)
        c_kv_BTC = self.kv_a_layernorm(c_kv_BTC)
        k_rope_BTR = apply_rope(k_rope_BTR[:, :, None, :], cos_TR, sin_TR, self.cfg.rope_interleave)[:, :, 0]
        if cache is not None:
            c_kv_BTC, k_rope_BTR = cache.update(start_pos, c_kv_BTC, k_rope_BTR)  # now all S positions
        absorb = (T == 1) if self.absorb is None else self.absorb
        if cache is not None and absorb:
            o_BTHv = self._attend_absorbed(q_BTHd, c_kv_BTC, k_rope_BTR, start_pos)
        else:
            o_BTHv = self._attend_expanded(q_BTHd, c_kv_BTC, k_rope_BTR, start_pos, cache is None)
        return self.o_proj(o_BTHv.reshape(B, T, H * self.v_dim))

    def _attend_expanded(self, q_BTHd, c_kv_BSC, k_rope_BSR, start_pos: int, record: bool):
        q_BHTd = q_BTHd.transpose(1, 2)
        args = (q_BHTd, c_kv_BSC, k_rope_BSR, start_pos, record)
        if self.cfg.recompute_kv:
            # Backward keeps the latent and attention's output, and rebuilds the per-head K/V (one small
            # matmul, C -> H * (n + v)) instead of keeping them: H * (2n + v + R) values per token.
            o_BHTv = recompute(self._expand_and_attend, *args, keep=ATTENTION)
        else:
            o_BHTv = self._expand_and_attend(*args)
        return o_BHTv.transpose(1, 2)

    def _expand_and_attend(self, q_BHTd, c_kv_BSC, k_rope_BSR, start_pos: int, record: bool):
        B, S, _ = c_kv_BSC.shape
        H = self.n_head
        k_nope_BSHn, v_BSHv = self.kv_b_proj(c_kv_BSC).view(B, S, H, -1).split([self.nope, self.v_dim], dim=-1)
        k_rope_BSHR = k_rope_BSR[:, :, None, :].to(k_nope_BSHn.dtype).expand(B, S, H, self.rope)
        k_BHSd = torch.cat([k_nope_BSHn, k_rope_BSHR], dim=-1).transpose(1, 2)
        if record:
            self._record(q_BHTd, k_BHSd)
        return attend(q_BHTd, k_BHSd, v_BSHv.transpose(1, 2), self.softmax_scale, start_pos)

    def _attend_absorbed(self, q_BTHd, c_kv_BSC, k_rope_BSR, start_pos: int):
        T, S = q_BTHd.shape[1], c_kv_BSC.shape[1]
        q_nope_BTHn, q_rope_BTHR = q_BTHd.split([self.nope, self.rope], dim=-1)
        w_HdC = self.kv_b_proj.weight.view(self.n_head, self.nope + self.v_dim, self.kv_lora_rank)
        w_uk_HnC, w_uv_HvC = w_HdC[:, : self.nope], w_HdC[:, self.nope :]
        q_lat_BTHC = torch.einsum("bthn,hnc->bthc", q_nope_BTHn, w_uk_HnC)  # q.k_nope == (q W_uk).c_kv
        s_BHTS = torch.einsum("bthc,bsc->bhts", q_lat_BTHC, c_kv_BSC)
        s_BHTS = (s_BHTS + torch.einsum("bthr,bsr->bhts", q_rope_BTHR, k_rope_BSR)) * self.softmax_scale
        q_pos = torch.arange(start_pos, start_pos + T, device=s_BHTS.device)
        mask_TS = torch.arange(S, device=s_BHTS.device)[None, :] > q_pos[:, None]
        p_BHTS = s_BHTS.float().masked_fill(mask_TS, float("-inf")).softmax(-1).to(c_kv_BSC.dtype)
        o_lat_BTHC = torch.einsum("bhts,bsc->bthc", p_BHTS, c_kv_BSC)
        return torch.einsum("bthc,hvc->bthv", o_lat_BTHC, w_uv_HvC)  # apply W_uv after attention

    @torch.no_grad()
    def qk_clip_scales(self, gamma_H: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """Per-row scales that multiply head h's logits by gamma_h: q_nope and k_nope rows by sqrt(gamma),
        q_rope rows by gamma, and the shared k_rope (in kv_a_proj_with_mqa) untouched since all heads
        use it. v rows stay 1. sqrt(1) == 1 exactly, so unclipped heads stay bit-identical."""
        H = self.n_head
        g_H = gamma_H.detach().to(device=self.kv_b_proj.weight.device, dtype=torch.float32)
        sq_H1 = g_H.sqrt()[:, None]
        q_rows = torch.cat([sq_H1.expand(H, self.nope), g_H[:, None].expand(H, self.rope)], dim=1).reshape(-1)
        kv_rows = torch.cat([sq_H1.expand(H, self.nope), torch.ones_like(sq_H1).expand(H, self.v_dim)], 1)
        return [(self._q_weight(), q_rows), (self.kv_b_proj.weight, kv_rows.reshape(-1))]

    def new_layer_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> MLALayerCache:
        return MLALayerCache(batch_size, max_len, self.kv_lora_rank, self.rope, device, dtype)


class MHA(_MaxLogitMixin, nn.Module):
    """Plain multi-head attention with RoPE over the whole head: the dense baseline (attention.type=mha)."""

    def __init__(self, dim: int, n_head: int, cfg: AttentionConfig):
        super().__init__()
        self.n_head, self.cfg = n_head, cfg
        self.head_dim = dim // n_head
        self.rope_dim = self.head_dim
        self.softmax_scale = self.head_dim**-0.5 * yarn_softmax_gain(cfg.rope_scaling)
        self.q_proj = nn.Linear(dim, dim, bias=cfg.bias)
        self.k_proj = nn.Linear(dim, dim, bias=cfg.bias)
        self.v_proj = nn.Linear(dim, dim, bias=cfg.bias)
        self.o_proj = nn.Linear(dim, dim, bias=cfg.bias)
        self._init_max_logits(n_head, cfg.track_max_logits)

    def forward(self, x_BTD, cos_TR, sin_TR, cache: MHALayerCache | None = None, start_pos: int = 0):
        B, T, D = x_BTD.shape
        H, Dh = self.n_head, self.head_dim
        q_BTHd, k_BTHd = self.q_proj(x_BTD).view(B, T, H, Dh), self.k_proj(x_BTD).view(B, T, H, Dh)
        if cos_TR is not None:  # None: the model adds learned positions instead (model.pos_emb=learned)
            q_BTHd = apply_rope(q_BTHd, cos_TR, sin_TR, self.cfg.rope_interleave)
            k_BTHd = apply_rope(k_BTHd, cos_TR, sin_TR, self.cfg.rope_interleave)
        q_BHTd, k_BHSd = q_BTHd.transpose(1, 2), k_BTHd.transpose(1, 2)
        v_BHSd = self.v_proj(x_BTD).view(B, T, H, Dh).transpose(1, 2)
        if cache is not None:
            k_BHSd, v_BHSd = cache.update(start_pos, k_BHSd, v_BHSd)
        else:
            self._record(q_BHTd, k_BHSd)
        o_BHTd = attend(q_BHTd, k_BHSd, v_BHSd, self.softmax_scale, start_pos)
        return self.o_proj(o_BHTd.transpose(1, 2).reshape(B, T, D))

    @torch.no_grad()
    def qk_clip_scales(self, gamma_H: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """q and k rows (and biases) of head h scale by sqrt(gamma_h), so its logits scale by gamma_h."""
        g_H = gamma_H.detach().to(device=self.q_proj.weight.device, dtype=torch.float32)
        rows = g_H.sqrt()[:, None].expand(self.n_head, self.head_dim).reshape(-1)
        out = [(self.q_proj.weight, rows), (self.k_proj.weight, rows)]
        if self.cfg.bias:
            out += [(self.q_proj.bias, rows), (self.k_proj.bias, rows)]
        return out

    def new_layer_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> MHALayerCache:
        return MHALayerCache(batch_size, max_len, self.n_head, self.head_dim, device, dtype)
