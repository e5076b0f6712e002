"""Training on several prepared datasets with weights (`data.mix`).

Window j of step s picks its source by weight from one splitmix64 hash of (seed, s, j), and its start inside
that source from another (the plain `window_starts` hash), so, as for one dataset, the windows a step reads
are a pure function of (seed, step, j): any world size, rank slicing or resume reads the same ones, and the
realised source counts of a step (`source_counts`) can be computed by every rank without communication.

The mixture may change on resume (new weights, sources added or dropped): the stream position is only the
step number, so the new mixture simply applies from that step (BatchIterator.load_state_dict says so).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kimi.config import DataConfig
from kimi.data.dataset import DataError, TokenDataset, _split_dir, _splitmix64, build_dataset, window_starts

_SOURCE_SALT = np.uint64(0x6D69787475726521)  # "mixture!": keeps the source hash independent of the start hash


def source_of(seed: int, step: int, start: int, count: int, cum_weights: np.ndarray) -> np.ndarray:
    """Source index of windows j = start .. start+count-1 of `step`: a function of (seed, step, j) only.
    `cum_weights` are the normalised cumulative weights (last entry 1.0)."""
    key = _splitmix64(_splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64) ^ _SOURCE_SALT))
    key = _splitmix64(key ^ np.uint64(step))
    j = np.arange(start, start + count, dtype=np.uint64)
    u = (_splitmix64(key ^ j) >> np.uint64(11)).astype(np.float64) / float(1 << 53)  # uniform in [0, 1)
    return np.minimum(np.searchsorted(cum_weights, u, side="right"), len(cum_weights) - 1)


class MixtureDataset(TokenDataset):
    """`sources` (same block_size, one tokenizer) drawn by `weights`; `names` key the metrics."""

    def __init__(self, sources: list[TokenDataset], weights: list[float], names: list[str], seed: int = 0):
        if not sources or len({s.block_size for s in sources}) != 1:
            raise DataError("data.mix needs at least one source, all with the same block_size")
        self.sources, self.names = sources, names
        self.weights = [float(w) for w in weights]
        self.cum_weights = np.cumsum(np.array(self.weights) / sum(self.weights))
        self.cum_weights[-1] = 1.0
        self.block_size, self.seed = sources[0].block_size, seed
        self.vocab_size = max(s.vocab_size for s in sources)
        # The virtual stream (eval_batches, split_batches) is the sources' windows one after another.
        self._win_ends = np.cumsum([s.num_windows for s in sources])
        self.num_tokens = int(self._win_ends[-1]) + self.block_size

    def _fill(self, src: np.ndarray, local: np.ndarray) -> np.ndarray:
        out = np.empty((len(src), self.block_size + 1), dtype=np.int64)
        for i, ds in enumerate(self.sources):
            rows = np.flatnonzero(src == i)
            if rows.size:
                out[rows] = ds._tokens(local[rows])
        return out

    def _tokens(self, starts: np.ndarray) -> np.ndarray:
        src = np.searchsorted(self._win_ends, starts, side="right")
        first = np.concatenate([[0], self._win_ends[:-1]])
        return self._fill(src, starts - first[src])

    def get_batch(self, step: int, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        src = source_of(self.seed, step, start, count, self.cum_weights)
        local = np.empty(count, dtype=np.int64)
        for i, ds in enumerate(self.sources):
            rows = np.flatnonzero(src == i)
            if rows.size:  # the start hash is the plain one, taken modulo this source's windows
                local[rows] = window_starts(self.seed, step, start, count, ds.num_windows)[rows]
        w = torch.from_numpy(self._fill(src, local))  # (B, T+1)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def source_counts(self, step: int, global_batch: int) -> list[int]:
        """How many of `step`'s `global_batch` windows each source gives (the same on every rank)."""
        src = source_of(self.seed, step, 0, global_batch, self.cum_weights)
        return np.bincount(src, minlength=len(self.sources)).tolist()

    def identity(self) -> dict[str, Any]:
        return {"kind": "mixture", "sources": [{"name": n, "weight": w, "data": s.identity()}
                                               for n, w, s in zip(self.names, self.weights, self.sources)]}  # fmt: skip


def build_data(data_cfg: DataConfig, block_size: int, vocab_size: int, seed: int, split: str = "train") -> TokenDataset:
    """What the trainer reads: the `data.mix` mixture where one is set, else `build_dataset` (one dataset)."""
    if data_cfg.mix:
        return build_mixture(data_cfg, block_size, vocab_size, seed, split)
    return build_dataset(data_cfg, block_size, vocab_size, seed, split)


def build_mixture(data_cfg: DataConfig, block_size: int, vocab_size: int, seed: int, split: str) -> MixtureDataset:
    """Each `data.mix` source through `build_dataset` (tokenizer and vocabulary checked as for one dataset),
    then one line if a source is shorter than a window or the sources' tokenizers differ."""
    made_with = {}  # checked before each source against data.tokenizer_name, so the line names the sources
    for m in data_cfg.mix:
        split_dir = _split_dir(Path(m.path).expanduser(), split)
        if split_dir is not None:
            man = json.loads((split_dir / "manifest.json").read_text())
            made_with[m.name] = (man.get("tokenizer"), sorted((man.get("tokenizer_files") or {}).values()))
    if len(set(map(str, made_with.values()))) > 1:
        which = ", ".join(f"{n}: {t[0]}" for n, t in made_with.items())
        raise DataError(f"data.mix sources were tokenised differently ({which}); re-run python -m kimi.prepare "
                        "on them with one --tokenizer")  # fmt: skip
    sources = []
    for m in data_cfg.mix:
        one = dataclasses.replace(data_cfg, dataset=m.path, mix=[])
        try:
            sources.append(build_dataset(one, block_size, vocab_size, seed, split))
        except DataError as e:
            raise DataError(f"data.mix source '{m.name}': {e}") from None
    return MixtureDataset(sources, [m.weight for m in data_cfg.mix], [m.name for m in data_cfg.mix], seed)
