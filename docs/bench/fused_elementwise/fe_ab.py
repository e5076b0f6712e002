"""In one process, alternating: byte.yaml's model forward + backward with its modules' `elementwise` eager, then
fused (kimi.parallel's compiled copies), N times each; medians. Run from the repository root:

    python docs/bench/fused_elementwise/fe_ab.py configs/bench/byte.yaml 8 30
"""

import importlib
import sys
import time

import torch

import kimi.host_memory as hm
from kimi.bench.variants import matched_pair
from kimi.model import KimiModel
from kimi.model.elementwise import ELEMENTWISE, Elementwise

torch.set_num_threads(2)
torch.manual_seed(0)
hm.keep_freed_memory()
importlib.import_module("kimi.parallel.parallelize")
fused = sys.modules["kimi.parallel.parallelize"].fused_elementwise("inductor")
cfg = matched_pair(sys.argv[1], [])[0]
model = KimiModel(cfg.model)
model.init_weights()
model.train()
callers = [m for m in model.modules() if isinstance(getattr(m, "elementwise", None), Elementwise)]
idx = torch.randint(0, cfg.model.vocab_size, (int(sys.argv[2]), cfg.model.block_size))


def use(on: bool) -> None:
    for m in callers:
        m.elementwise = fused if on else ELEMENTWISE


def step() -> float:
    loss = model(idx, idx).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.item()


for on in (False, True, False, True):  # compile, and warm both
    use(on)
    print("fused" if on else "eager", "loss", step())
times = {False: [], True: []}
for i in range(int(sys.argv[3])):
    for on in (False, True) if i % 2 == 0 else (True, False):
        use(on)
        t0 = time.perf_counter()
        step()
        times[on].append(time.perf_counter() - t0)
for on, ts in times.items():
    ts.sort()
    print("fused" if on else "eager", f"median {ts[len(ts) // 2] * 1e3:.0f} ms, min {ts[0] * 1e3:.0f}")
