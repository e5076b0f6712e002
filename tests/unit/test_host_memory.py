"""kimi.host_memory: with glibc's heap kept, reallocating a big tensor faults no pages in; the environment wins.

Each case runs in a fresh interpreter: the setting is process-wide and permanent.
"""

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)

# Median page faults of reallocating a 64 MiB tensor (16,384 pages of 4 KiB), over 9 times after 6 warm-up
# ones (the heap grows for the first few, sometimes up to the 7th), after setting up the runtime the way
# kimi.train does on CPU with train.cpu_keep_freed_memory=KEEP.
_SCRIPT = """
import resource, sys, torch
from kimi.config import KimiConfig, ParallelConfig, TrainConfig
from kimi.runtime import setup_runtime
setup_runtime(TrainConfig(device="cpu", cpu_keep_freed_memory=sys.argv[1] == "1"), ParallelConfig(), KimiConfig())
x = torch.ones(16 * 1024 * 1024)  # 64 MiB
faults = []
for _ in range(15):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    (x * 2).sum()  # a fresh 64 MiB result each time, freed at once
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(faults[6:])[4])
"""


def _faults_per_alloc(keep: bool, env: dict | None = None) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | (env or {})
    env["OMP_NUM_THREADS"] = "1"
    p = subprocess.run([sys.executable, "-c", _SCRIPT, "1" if keep else "0"], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    return int(p.stdout.split()[-1])


def test_kept_heap_reuses_big_blocks_without_page_faults():
    faults_default = _faults_per_alloc(keep=False)
    faults_kept = _faults_per_alloc(keep=True)
    assert faults_default > 8_000, faults_default  # each 64 MiB result freshly mapped: ~16k faults
    assert faults_kept < 100, faults_kept  # the heap's freed block reused


def test_environment_settings_of_glibc_malloc_win():
    # kimi.bench memory fixes the mmap threshold this way to measure peaks; the trainer must leave it be.
    faults = _faults_per_alloc(keep=True, env={"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)})
    assert faults > 8_000, faults
