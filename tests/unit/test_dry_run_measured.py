"""--dry-run's per-rank estimate of parameters + gradients + optimizer state against what a real engine holds.

kimi.bench.state trains 2 steps of the debug model (8 experts) and sums the storages of every live tensor just
before the second optimizer step is applied (parameters, gradients, the first step's optimizer state, DeepSpeed's
fp32 master partitions); the estimate is kimi/engine/<name>.py `memory_estimate` for the same layout and device
(here fp32 on CPU). Goal (issue 17): within 20%. Measured (2-core CPU): FSDP2 exact at world 1 and 2
(ratio 1.000), ZeRO-2 1.000 and 0.998. Seen red with the estimate's working copies in bf16 whatever the
device (the old model): ZeRO-2 at world 1 predicted 0.77 of what it held.
The full table at world 1 to 8 is in docs/training.md (python -m kimi.bench state).
"""

from pathlib import Path

import pytest

from tests.dist_utils import run_distributed

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "debug.yaml")
# FSDP2 first: a finished DeepSpeed run leaves most of its states alive in the process (seen here: ZeRO-2
# after ZeRO-1 held 10 MB more), which the next measurement would count. ZeRO-1 holds what ZeRO-2 holds at
# the step; the two differ only inside it (the estimate's `buffers`, not measured here).
ENGINES = ("fsdp2", "zero2")
TOLERANCE = 0.2


def _measure_all(rank, world, tmp):
    from kimi.bench.state import layout_args, measure

    return {e: measure(CONFIG, [f"--train.out_dir={tmp}/{e}", "--moe.num_experts=8", *layout_args(e, world, 8, 8)])
            for e in ENGINES}  # fmt: skip


def _check(results: list[dict]) -> None:
    for rank, res in enumerate(results):
        for engine, r in res.items():
            ratio = r["predicted"] / r["held"]
            assert abs(ratio - 1) <= TOLERANCE, (
                f"{engine} rank {rank}: predicted {r['predicted']:.0f} B, held {r['held']} B"
            )


@pytest.mark.parametrize("world", [1, 2])
def test_ranks_hold_what_the_dry_run_predicts(tmp_path, world):
    # A fresh process also at world 1: the measurement counts every live tensor of the process.
    _check(run_distributed(_measure_all, world, args=(str(tmp_path),), timeout=600))
