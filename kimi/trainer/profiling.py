"""`train.profile_steps=A:B`: a torch.profiler trace of steps A..B, one per rank; `train.memory_snapshot`: the
CUDA allocator's history over the same steps.

    profiler = StepProfiler(cfg.train, rt.rank, rt.device, say=rt.print)
    for step ...:
        with profiler.step(step):          # starts before step A, stops and writes after step B
            row, stop = trainer.train_step(step)
    profiler.close(tracker)                # a window cut short by the end of the run is written too; rank 0
                                           # logs every rank's files to MLflow under profile/

Files: OUT/profile/rank{r}_steps_A-B.json (Chrome trace format: ui.perfetto.dev or chrome://tracing), each
step inside a `train_step#N` range; OUT/profile/rank{r}_ops_steps_A-B.json, each operator's self time per
step (device time on CUDA, CPU time otherwise; the table `kimi.bench throughput --ops` prints);
OUT/profile/rank{r}_memory_steps_A-B.pickle (CUDA: open it in pytorch.org/memory_viz). Distinct from
`train.profile`, which times the step's phases into the metrics rows.
The profiler covers train_step (forward, backward, optimizer), not validation or checkpoint saves.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

OUTSIDE_OPS = "(outside any op: Python)"  # the ops file's name for time in a step but in no operator
MEMORY_HISTORY_ENTRIES = 100_000  # allocator events kept (a ring): enough for a few steps of a small model


class StepProfiler:
    def __init__(self, train, rank: int, device: torch.device, say: Callable[[str], None] = print):
        """`train`: the run's TrainConfig (profile_steps, memory_snapshot, out_dir)."""
        self.window = train.profile_window()
        self.dir, self.rank = Path(train.out_dir) / "profile", rank
        self.cuda = device.type == "cuda"
        self.memory = train.memory_snapshot and self.cuda
        if train.memory_snapshot and not self.cuda:
            say(f"train.memory_snapshot: CUDA only, and this run is on {device.type}; no memory snapshot")
        self._prof: profile | None = None
        self._steps = 0  # steps inside the running profiler (fewer than the window on a resume inside it)

    def _name(self, rank: int, what: str = "", suffix: str = "json") -> Path:
        a, b = self.window
        return self.dir / f"rank{rank}_{what}steps_{a}-{b}.{suffix}"

    @contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Around one training step: the first step of the window (or the first one this run trains, on a
        resume inside it) starts the profiler, the last one stops it and writes the files."""
        if self.window is None or not self.window[0] <= step <= self.window[1]:
            yield
            return
        if self._prof is None:
            self._start()
        with record_function(f"train_step#{step}"):
            yield
        self._steps += 1
        if step == self.window[1]:
            self._stop()

    def _start(self) -> None:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self._prof = profile(activities=activities)
        if self.memory:
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
        self._prof.start()

    def _stop(self) -> None:
        if self._prof is None:
            return
        prof, self._prof = self._prof, None
        prof.stop()
        self.dir.mkdir(parents=True, exist_ok=True)
        trace = self._name(self.rank)
        prof.export_chrome_trace(str(trace))
        ops = op_self_times(prof, self._steps, self.cuda)
        self._name(self.rank, "ops_").write_text(json.dumps(ops, indent=1))
        self._steps = 0
        if self.memory:
            snapshot = self._name(self.rank, "memory_", "pickle")
            torch.cuda.memory._dump_snapshot(str(snapshot))
            torch.cuda.memory._record_memory_history(enabled=None)

    def close(self, tracker) -> None:
        """At the end of the run: write a window the run ended inside; rank 0 hands every rank's files that
        exist to the tracker (MLflow artifacts under profile/; the tracker never raises)."""
        try:
            self._stop()
        finally:
            if self.window is not None and self.rank == 0 and self.dir.is_dir():
                a, b = self.window
                for f in sorted(self.dir.glob(f"rank*_*steps_{a}-{b}.*")):
                    tracker.log_artifact(f, "profile")


def op_self_times(prof: profile, steps: int, cuda: bool) -> dict:
    """Each operator's self time per step over a stopped profiler's `steps` steps, most first: device time on
    CUDA (kernels run asynchronously, so CPU time would count launches), CPU time otherwise. The
    `train_step#N` markers' own self time (Python between ops) is one entry, OUTSIDE_OPS; on CPU all of
    them add up to about the steps' wall time."""
    self_us = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    per: dict[str, float] = {}
    for e in prof.key_averages():
        key = OUTSIDE_OPS if e.key.startswith("train_step#") else e.key
        per[key] = per.get(key, 0.0) + self_us(e) / 1e6 / max(steps, 1)
    per = dict(sorted(((k, v) for k, v in per.items() if v > 0), key=lambda kv: -kv[1]))
    return {"steps": steps, "time": "device" if cuda else "cpu", "ops_s_per_step": per}
