"""What a data mixture (`data.mix`) reports on logged steps: each source's share of the windows since the
last logged step (`mix_frac/<name>`) and the epochs of it trained so far (`mix_epochs/<name>`).

A step's source counts are a pure function of (seed, step) (MixtureDataset.source_counts), so every rank
has them without communication. The windows seen per source over the whole run ride in the checkpoint's
train state by name, so they survive a resume, and a mixture changed on resume keeps its sources' counts.
"""

from __future__ import annotations

from typing import Any


class MixtureStats:
    def __init__(self, dataset, global_batch_size: int) -> None:
        self.ds, self.global_batch_size = dataset, global_batch_size
        self.since_log = [0] * len(dataset.names)
        self.seen: dict[str, int] = {}  # windows trained per source name, over the whole run

    def load(self, state: dict[str, Any]) -> None:
        self.seen = dict(state.get("mix_windows") or {})

    def state(self) -> dict[str, Any]:
        return {"mix_windows": dict(self.seen)}

    def add(self, step: int) -> None:
        counts = self.ds.source_counts(step, self.global_batch_size)
        self.since_log = [a + b for a, b in zip(self.since_log, counts)]
        for name, c in zip(self.ds.names, counts):
            self.seen[name] = self.seen.get(name, 0) + c

    def row(self) -> dict[str, float]:
        """The logged step's metrics; the fractions restart from here."""
        total, out = sum(self.since_log), {}
        for name, src, c in zip(self.ds.names, self.ds.sources, self.since_log):
            out[f"mix_frac/{name}"] = c / total
            out[f"mix_epochs/{name}"] = self.seen[name] * self.ds.block_size / src.num_tokens
        self.since_log = [0] * len(self.since_log)
        return out
