"""Page faults and time per op in a model's forward + backward, step after step, in one fresh process.

    python docs/bench/xeon2/faults_per_step.py kimi|dense_muon STEPS [BATCH]

nano.yaml's model (or compare's dense_muon at its active size) on random tokens, glibc's heap kept as
kimi.train keeps it (kimi.host_memory). Prints each step's fault count, its time, and the ops with the most time.
"""

import collections
import resource
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kimi.host_memory
from kimi.bench.variants import build_variants
from kimi.config import load_config, parse_overrides
from kimi.model import KimiModel


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class PerOp(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.faults, self.seconds = collections.Counter(), collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        f0, t0 = faults(), time.perf_counter()
        out = func(*args, **(kwargs or {}))
        name = str(func) + (str([tuple(a.shape) for a in args[:2]]) if "mm" in str(func) else "")
        self.faults[name] += faults() - f0
        self.seconds[name] += time.perf_counter() - t0
        return out


def main(name: str, steps: int, batch: int) -> None:
    print("glibc heap kept:", kimi.host_memory.keep_freed_memory())
    variants, _ = build_variants("configs/nano.yaml", [1e-3], ["dense_muon"], parse_overrides([]))
    cfg = load_config("configs/nano.yaml", next(v for v in variants if v.name == name).overrides)
    model = KimiModel(cfg.model).train()
    idx_BT = torch.randint(0, cfg.model.vocab_size, (batch, cfg.model.block_size))
    for step in range(1, steps + 1):
        with PerOp() as ops:
            model(idx_BT, idx_BT).loss.backward()
        model.zero_grad(set_to_none=True)
        print(f"{name} step {step}: {sum(ops.faults.values())} faults, {sum(ops.seconds.values()):.2f} s in ops")
        for op, s in ops.seconds.most_common(3):
            print(f"    {s * 1e3:8.0f} ms {ops.faults[op]:8d} faults  {op}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 32)
