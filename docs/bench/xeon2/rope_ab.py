"""MLA's RoPE before and after 137ceb7, in one process, interleaved: 81653b4's path (split q into nope and
rope, rotate with four multiplies, two adds and a cat, cat q back together) against the working tree's
(rotate q whole as one complex multiply, the nope pairs by 1).

    python docs/bench/xeon2/rope_ab.py layer [REPS]        # one MLA layer forward + backward, B 32, T 256
    python docs/bench/xeon2/rope_ab.py model [STEPS] [B]   # nanoKimi at nano's matched size, forward + backward

Prints the median time of each and the largest difference of the outputs and input gradients.
"""

import statistics
import sys
import time

import torch

import kimi.host_memory
import kimi.model.attention as attention
from kimi.bench.variants import matched_pair
from kimi.model import KimiModel
from kimi.model.layers import rope_cos_sin


def old_rope(x, cos_TR, sin_TR, interleave):
    """81653b4's apply_rope: rotated pairs written out as [firsts, seconds]."""
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos_TR[:, None, :].to(x.dtype), sin_TR[:, None, :].to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def old_forward(self, x_BTD, cos_TR, sin_TR, cache=None, start_pos=0):
    """81653b4's MLA.forward for training (no cache), on the same weights."""
    B, T, _ = x_BTD.shape
    H = self.n_head
    q = self.q_proj(x_BTD) if self.cfg.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))
    q_nope_BTHn, q_rope_BTHR = q.view(B, T, H, -1).split([self.nope, self.rope], dim=-1)
    c_kv_BTC, k_rope_BTR = self.kv_a_proj_with_mqa(x_BTD).split([self.kv_lora_rank, self.rope], dim=-1)
    c_kv_BTC = self.kv_a_layernorm(c_kv_BTC)
    q_rope_BTHR = old_rope(q_rope_BTHR, cos_TR, sin_TR, self.cfg.rope_interleave)
    k_rope_BTR = old_rope(k_rope_BTR[:, :, None, :], cos_TR, sin_TR, self.cfg.rope_interleave)[:, :, 0]
    q_BTHd = torch.cat([q_nope_BTHn, q_rope_BTHR], dim=-1)
    o_BTHv = self._attend_expanded(q_BTHd, c_kv_BTC, k_rope_BTR, start_pos, True)
    return self.o_proj(o_BTHv.reshape(B, T, H * self.v_dim))


NEW_FORWARD = attention.MLA.forward


def timed_pairs(run, reps: int, warmup: int = 2):
    """run(impl) for impl in (old, new), alternating, `reps` times after `warmup` pairs; medians in s."""
    times = {"old": [], "new": []}
    outs = {}
    for i in range(warmup + reps):
        for name, fwd in (("old", old_forward), ("new", NEW_FORWARD)):
            attention.MLA.forward = fwd
            t0 = time.perf_counter()
            outs[name] = run()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    attention.MLA.forward = NEW_FORWARD
    return {k: statistics.median(v) for k, v in times.items()}, outs


def main(what: str, reps: int, batch: int) -> None:
    kimi.host_memory.keep_freed_memory()  # as kimi.train does
    torch.manual_seed(0)
    kimi_cfg, _ = matched_pair("configs/nano.yaml", [])
    if what == "layer":
        layer = attention.MLA(kimi_cfg.model.n_embd, kimi_cfg.model.n_head, kimi_cfg.model.attention).train()
        x = torch.randn(batch, 256, kimi_cfg.model.n_embd, requires_grad=True)
        cos, sin = rope_cos_sin(torch.arange(256), layer.rope, 10000.0)

        def run():
            y = layer(x, cos, sin)
            y.sum().backward()
            out = (y.detach(), x.grad)
            x.grad = None
            layer.zero_grad(set_to_none=True)
            return out

    else:
        model = KimiModel(kimi_cfg.model).train()
        idx = torch.randint(0, kimi_cfg.model.vocab_size, (batch, 256))

        def run():
            out = model(idx, idx).loss
            out.backward()
            model.zero_grad(set_to_none=True)
            return (out.detach(), out.detach())

    med, outs = timed_pairs(run, reps)
    dy = (outs["old"][0] - outs["new"][0]).abs().max().item()
    dg = (outs["old"][1] - outs["new"][1]).abs().max().item()
    print(
        f"{what}, B {batch} x 256, {torch.get_num_threads()} thread(s), median of {reps}: "
        f"old {med['old'] * 1e3:.1f} ms, new {med['new'] * 1e3:.1f} ms ({med['new'] / med['old']:.3f}x); "
        f"max |diff| output {dy:.2e}, input grad {dg:.2e}"
    )


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "layer"
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else (15 if what == "layer" else 4)
    main(what, reps, int(sys.argv[3]) if len(sys.argv) > 3 else 32)
