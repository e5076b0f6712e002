"""Per-op self time of byte.yaml's model and its nanoGPT-equivalent: forward + backward at batch B, two threads,
three profiled steps after four warm ones. A third argument compiles nanoKimi's elementwise chains
(train.fused_elementwise). Run from the repository root:

    python docs/bench/fused_elementwise/full.py configs/bench/byte.yaml 8 [fused]
"""

import importlib
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import kimi.host_memory as hm
from kimi.bench.variants import matched_pair
from kimi.model import KimiModel

GEMM = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm"}
ATTN = {
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
}

torch.set_num_threads(2)
hm.keep_freed_memory()
kimi_cfg, gpt_cfg = matched_pair(sys.argv[1], [])
B = int(sys.argv[2])
for name, cfg in (("kimi", kimi_cfg), ("gpt", gpt_cfg)):
    model = KimiModel(cfg.model)
    model.init_weights()
    model.train()
    if name == "kimi" and len(sys.argv) > 3:
        importlib.import_module("kimi.parallel.parallelize")
        sys.modules["kimi.parallel.parallelize"].apply_fused_elementwise(model)
    idx = torch.randint(0, cfg.model.vocab_size, (B, cfg.model.block_size))
    for _ in range(4):
        model(idx, idx).loss.backward()
        model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            model(idx, idx).loss.backward()
            model.zero_grad(set_to_none=True)
    ops = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ops) / 3e3
    gemm = sum(e.self_cpu_time_total for e in ops if e.key in GEMM | ATTN) / 3e3
    print(f"== {name}: self time {total:.0f} ms a step, matmuls + attention {gemm:.0f}, other {total - gemm:.0f}")
    for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[:40]:
        print(f"  {e.self_cpu_time_total / 3e3:7.1f} ms x{e.count / 3:6.1f} {e.key}")
