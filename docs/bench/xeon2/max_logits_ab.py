"""Time spent in QK-clip's causal_max_logits inside a model's forward + backward: 17f2bad's version
(scale, mask into a copy, reduce) against this commit's (reduce over the batch, mask, scale the maxima).

    python docs/bench/xeon2/max_logits_ab.py configs/nano.yaml 32 [STEPS]
"""

import sys
import time

import torch

import kimi.host_memory
import kimi.model.attention as attention
from kimi.config import load_config
from kimi.model import KimiModel
from kimi.model.layers import fp32_region

new = attention.causal_max_logits


@torch.no_grad()
def old(q_BHTd, k_BHSd, scale):
    with fp32_region(q_BHTd.device):
        B, H, T, _ = q_BHTd.shape
        S = k_BHSd.shape[2]
        offset, k = S - T, k_BHSd.float()
        chunk = max(1, min(T, attention._MAX_LOGIT_CHUNK_ELEMS // max(1, B * H * S)))
        out_H = torch.full((H,), float("-inf"), device=q_BHTd.device)
        for t0 in range(0, T, chunk):
            t1 = min(T, t0 + chunk)
            kv_end = offset + t1
            s_BHcs = (q_BHTd[:, :, t0:t1].float() @ k[:, :, :kv_end].transpose(-1, -2)) * scale
            q_pos, k_pos = torch.arange(offset + t0, offset + t1), torch.arange(kv_end)
            s_BHcs = s_BHcs.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
            out_H = torch.maximum(out_H, s_BHcs.amax(dim=(0, 2, 3)))
        return out_H


def main(config: str, batch: int, steps: int) -> None:
    kimi.host_memory.keep_freed_memory()
    cfg = load_config(config)
    torch.manual_seed(0)
    model = KimiModel(cfg.model).train()
    idx_BT = torch.randint(0, cfg.model.vocab_size, (batch, cfg.model.block_size))
    spent = {"old": 0.0, "new": 0.0}

    def timed(name, fn):
        def wrapper(*args):
            t0 = time.perf_counter()
            out = fn(*args)
            spent[name] += time.perf_counter() - t0
            return out

        return wrapper

    for step in range(steps + 1):  # the first pair warms up
        for name, fn in (("old", old), ("new", new)):
            attention.causal_max_logits = timed(name, fn)
            model(idx_BT, idx_BT).loss.backward()
            model.zero_grad(set_to_none=True)
            if step == 0:
                spent[name] = 0.0
    print(
        {k: f"{v / steps * 1e3:.0f} ms a step" for k, v in spent.items()},
        f"inside causal_max_logits ({config}, {batch})",
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 2)
