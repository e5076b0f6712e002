"""In-process A/B of MLA's attention: the model's forward + backward with `attend` padding the values (SDPA's
CPU flash kernel) against the unpadded call of fdf0114 (SDPA's math fallback), alternating in one process.

    python docs/bench/xeon/pad_ab.py configs/nano.yaml 32 6          # config, batch, pairs
"""

import statistics
import sys
import time

import torch
import torch.nn.functional as F

import kimi.model.attention as attention
from kimi.bench.variants import matched_pair
from kimi.host_memory import keep_freed_memory
from kimi.model import KimiModel


def unpadded(q, k, v, scale, start_pos):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def main(config: str, batch: int, pairs: int) -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    keep_freed_memory()  # as the trainer does
    cfg = matched_pair(config, [])[0]
    model = KimiModel(cfg.model)
    model.init_weights()
    model.train()
    shape = (batch, cfg.model.block_size)
    idx = torch.randint(0, cfg.model.vocab_size, shape)
    tgt = torch.randint(0, cfg.model.vocab_size, shape)
    res = {"pad": [], "math": []}
    ways = [("pad", attention.attend), ("math", unpadded)]
    for i in range(pairs):
        for name, fn in ways if i % 2 == 0 else ways[::-1]:
            attention.attend = fn
            model(idx, tgt).loss.backward()  # one warm step after the switch
            t0 = time.perf_counter()
            model(idx, tgt).loss.backward()
            res[name].append(time.perf_counter() - t0)
    p, q = statistics.median(res["pad"]), statistics.median(res["math"])
    each = " ".join(f"{a / b:.3f}" for a, b in zip(res["pad"], res["math"]))
    print(f"{config} B{batch}: fwd+bwd pad {p * 1e3:.0f} ms, math {q * 1e3:.0f} ms, ratio {p / q:.3f}; pairs {each}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
