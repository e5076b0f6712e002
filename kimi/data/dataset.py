"""Token datasets and the per-rank batch iterator.

The data a run sees is a pure function of (seed, step): window j of step s starts at
`hash(seed, s, j) mod num_windows`, uniformly over every valid start in the concatenated shards (windows
may cross documents and shards, as in nanoGPT). A data-parallel rank takes its slice [start, start+count) of
the global batch's windows, and micro-batches are slices of that, so

  - runs at any world size and accumulation see exactly the same windows at each step;
  - a resumed (or resharded) run continues the stream given only the step number;
  - no state has to be saved but (step, seed) and which dataset it was.

The hash is splitmix64 (counter-based), not a sequential generator: window j never depends on how many
windows were drawn before it, so a rank can compute its slice without drawing the others'.

    ds = build_dataset(cfg.data, block_size, vocab_size, seed)          # "toy" or a prepared dir
    it = BatchIterator(ds, global_batch_size=32, micro_batch_size=8, dp_rank=0, dp_world=2)
    for x, y in it.next_step(): ...                                     # it.grad_accum == 2 micro-batches
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kimi.config import DataConfig
from kimi.data.shards import ShardError, open_split, verify_split
from kimi.data.tokenizer_files import TokenizerFileError, split_spec, tokenizer_files


class DataError(ValueError):
    """Bad dataset or batch settings; the message says how to fix them."""


_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A bijective 64-bit mixer (Steele et al.); uint64 arithmetic wraps, which is what we want."""
    with np.errstate(over="ignore"):
        z = (x + np.uint64(0x9E3779B97F4A7C15)) & _M64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
        return z ^ (z >> np.uint64(31))


def window_starts(seed: int, step: int, start: int, count: int, num_windows: int) -> np.ndarray:
    """Start offsets of windows j = start .. start+count-1 of `step`: a function of (seed, step, j) only."""
    key = _splitmix64(_splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64)) ^ np.uint64(step))
    j = np.arange(start, start + count, dtype=np.uint64)
    return (_splitmix64(key ^ j) % np.uint64(num_windows)).astype(np.int64)


class TokenDataset(ABC):
    """A stream of `num_tokens` token ids cut into windows of `block_size + 1` tokens.

    The contract a custom dataset implements (train through `data.dataset=package.module:factory`, or
    `kimi.train.train(cfg, train_set=..., val_set=...)`): set `vocab_size`, `block_size`, `num_tokens` and
    `seed`, and provide `_tokens(starts) -> (n, block_size + 1) int64 array` (the windows starting at those
    token offsets, each start in [0, num_windows)) and `identity()` (a small JSON-able dict that changes when
    the data does: a resume refuses a different identity). Which windows a step reads is this base class's
    business, fixed by (seed, step); the stream position lives in BatchIterator.state_dict(), so the dataset
    itself keeps no state and every rank, world size and resume reads the same windows."""

    vocab_size: int
    block_size: int
    num_tokens: int
    seed: int

    @abstractmethod
    def _tokens(self, starts: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """What must match for a saved stream position to mean the same data (seed excluded)."""

    @property
    def num_windows(self) -> int:
        return self.num_tokens - self.block_size  # valid starts: 0 .. num_tokens - (block_size + 1)

    def _check_size(self, where: str) -> None:
        if self.num_windows < 1:
            raise DataError(
                f"{where} holds {self.num_tokens} tokens, fewer than block_size+1 = {self.block_size + 1}; "
                "use more text or a smaller block_size"
            )

    def _pair(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.from_numpy(self._tokens(starts))  # (B, T+1)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def get_batch(self, step: int, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), each a (count, block_size) LongTensor on CPU: windows start..start+count-1 of `step`,
        y shifted one token ahead of x."""
        return self._pair(window_starts(self.seed, step, start, count, self.num_windows))

    def eval_batches(self, n_batches: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`n_batches` fixed (x, y) batches, evenly spaced over the data: the same on every call, so
        validation losses are comparable across steps and runs."""
        n = n_batches * batch_size
        starts = np.linspace(0, self.num_windows - 1, n).round().astype(np.int64) if n else np.zeros(0, np.int64)
        return [self._pair(starts[i : i + batch_size]) for i in range(0, n, batch_size)]

    def split_batches(
        self, batch_size: int, max_windows: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The whole stream in non-overlapping windows (the last partial one dropped), `batch_size` at a time:
        every token is scored exactly once. `max_windows` keeps only the first windows."""
        T = self.block_size
        starts = np.arange(0, self.num_tokens - T, T, dtype=np.int64)[:max_windows]  # window i reads [s, s+T+1)
        for i in range(0, len(starts), batch_size):
            yield self._pair(starts[i : i + batch_size])


class ShardDataset(TokenDataset):
    """A split directory written by `python -m kimi.prepare`, memory-mapped (pages load on demand).
    `verify`: check each shard's sha256 against the manifest (once per file version, see `verify_split`)."""

    def __init__(self, path_dir: str | Path, block_size: int, seed: int = 0, verify: bool = True):
        self.path = Path(path_dir)
        self.manifest, self._maps = open_split(self.path)
        if verify:
            verify_split(self.path, self.manifest)
        self.vocab_size = int(self.manifest["vocab_size"])
        self.block_size, self.seed = block_size, seed
        sizes = np.array([m.size for m in self._maps], dtype=np.int64)
        self._ends = np.cumsum(sizes)  # shard i holds global offsets [ends[i] - sizes[i], ends[i])
        self.num_tokens = int(self._ends[-1]) if sizes.size else 0
        self._check_size(f"'{self.path}'")

    def _tokens(self, starts: np.ndarray) -> np.ndarray:
        T1 = self.block_size + 1
        out = np.empty((len(starts), T1), dtype=np.int64)
        for row, g in enumerate(starts.tolist()):
            filled = 0
            while filled < T1:  # a window that crosses shard boundaries is read piece by piece
                pos = g + filled
                i = int(np.searchsorted(self._ends, pos, side="right"))
                lo = pos - (int(self._ends[i]) - self._maps[i].size)
                piece = self._maps[i][lo : lo + T1 - filled]
                out[row, filled : filled + piece.size] = piece
                filled += piece.size
        return out

    def identity(self) -> dict[str, Any]:
        m = self.manifest
        return {"kind": "shards", "corpus": m.get("corpus"), "split": m.get("split"), "tokenizer": m.get("tokenizer"),
                "num_tokens": self.num_tokens, "fingerprint": m.get("fingerprint")}  # fmt: skip


class ToyDataset(TokenDataset):
    """Synthetic tokens for zero-setup runs and tests, with structure a model can learn.

    The stream is a random sequence of 64 random "phrases" of 8 tokens each: the first token of a phrase
    is a guess among 64, the next 7 are determined, so the loss can fall from ln(vocab) towards ~0.5 nat.
    The phrase table is shared by the splits; train and val draw different phrase sequences."""

    PHRASES, PHRASE_LEN = 64, 8

    def __init__(
        self, vocab_size: int, block_size: int, seed: int = 0, split: str = "train", num_tokens: int = 1 << 20
    ):
        self.vocab_size, self.block_size, self.seed, self.split = vocab_size, block_size, seed, split
        table = np.random.default_rng(1234).integers(0, vocab_size, (self.PHRASES, self.PHRASE_LEN))
        order = np.random.default_rng(0 if split == "train" else 1).integers(
            0, self.PHRASES, -(-num_tokens // self.PHRASE_LEN)
        )
        self._data = table[order].reshape(-1)[:num_tokens].astype(np.int64)
        self.num_tokens = num_tokens
        self._check_size("the toy dataset")

    def _tokens(self, starts: np.ndarray) -> np.ndarray:
        return self._data[starts[:, None] + np.arange(self.block_size + 1)]

    def identity(self) -> dict[str, Any]:
        return {"kind": "toy", "split": self.split, "vocab_size": self.vocab_size, "num_tokens": self.num_tokens}


class BatchIterator:
    """This rank's micro-batches, step after step.

    Of the `global_batch_size` windows of a step, rank r owns [r * G/W, (r+1) * G/W), served as
    `grad_accum` micro-batches of `micro_batch_size`. `state_dict()` is the stream position; loading it
    at any world size resumes the same global stream."""

    def __init__(
        self, dataset: TokenDataset, global_batch_size: int, micro_batch_size: int, dp_rank: int = 0, dp_world: int = 1
    ):
        if micro_batch_size < 1 or dp_world < 1 or not 0 <= dp_rank < dp_world:
            raise DataError(
                f"micro_batch_size={micro_batch_size} must be >= 1 and dp_rank={dp_rank} in [0, {dp_world})"
            )
        if global_batch_size % (micro_batch_size * dp_world) != 0:
            raise DataError(
                f"train.global_batch_size={global_batch_size} is not divisible by train.micro_batch_size * "
                f"data-parallel ranks = {micro_batch_size} * {dp_world}; pick a global batch that is a multiple of "
                f"{micro_batch_size * dp_world}"
            )
        self.dataset, self.global_batch_size, self.micro_batch_size = dataset, global_batch_size, micro_batch_size
        self.dp_rank, self.dp_world = dp_rank, dp_world
        self.step = 0  # the next step to serve
        self.mixture_change: str | None = None  # set by load_state_dict where a resumed mixture differs

    @property
    def grad_accum(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_world)

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        per_rank = self.global_batch_size // self.dp_world
        base = self.dp_rank * per_rank
        micro = [
            self.dataset.get_batch(self.step, base + i * self.micro_batch_size, self.micro_batch_size)
            for i in range(self.grad_accum)
        ]
        self.step += 1
        return micro

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "seed": self.dataset.seed, "dataset": self.dataset.identity(),
                "global_batch_size": self.global_batch_size}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the stream position. A data mixture may change (weights, sources): it applies from the
        saved step on, and `mixture_change` holds the one line that says so (the trainer prints it)."""
        old, new = state["dataset"], self.dataset.identity()
        self.mixture_change = None
        if old != new and old.get("kind") == new.get("kind") == "mixture":
            self.mixture_change = f"data mixture changed on resume: {_weights(old)} -> {_weights(new)}"
            if _weights(old) == _weights(new):
                self.mixture_change += " (a source's data changed)"
        elif old != new:
            raise DataError(
                f"the checkpoint was trained on a different dataset ({state['dataset']}) than this run's "
                f"({self.dataset.identity()}); resume with the same --data.dataset, or start a new out_dir"
            )
        if state["seed"] != self.dataset.seed:
            raise DataError(
                f"the checkpoint's data seed is {state['seed']} but this run's is {self.dataset.seed}; "
                f"resume with --train.seed={state['seed']}"
            )
        self.step = int(state["step"])


def _weights(mixture_identity: dict[str, Any]) -> str:
    return ", ".join(f"{s['name']}:{s['weight']:g}" for s in mixture_identity["sources"])


def _split_dir(root: Path, split: str) -> Path | None:
    if (root / split / "manifest.json").is_file():
        return root / split
    if (root / "manifest.json").is_file():  # a split dir itself; prefer its sibling for the other split
        sibling = root.parent / split
        if root.name in ("train", "val") and root.name != split and (sibling / "manifest.json").is_file():
            return sibling
        return root
    return None


def build_dataset(
    data_cfg: DataConfig, block_size: int, vocab_size: int, seed: int, split: str = "train"
) -> TokenDataset:
    """`data.dataset` = "toy", a directory from `python -m kimi.prepare` (its root or one split dir), or
    `package.module:factory`, a callable `factory(split=, block_size=, vocab_size=, seed=)` returning a
    TokenDataset (see its contract)."""
    if data_cfg.mix:  # kimi.data.mixture imports this module, so the dispatch lives there
        raise DataError("data.mix is set: build the data with kimi.data.mixture.build_data, which reads mixtures")
    if data_cfg.dataset == "toy":
        return ToyDataset(vocab_size, block_size, seed, split)
    if _is_factory(data_cfg.dataset):
        return _from_factory(data_cfg.dataset, block_size, vocab_size, seed, split)
    root = Path(data_cfg.dataset).expanduser()
    split_dir = _split_dir(root, split)
    if split_dir is None:
        if not root.exists():
            raise DataError(
                f"data directory '{root}' not found; run python -m kimi.prepare --corpus shakespeare --out {root}"
            )
        what = "is a file, not" if not root.is_dir() else "is not"
        raise DataError(
            f"'{root}' {what} a prepared dataset directory (no {split}/manifest.json); prepare one with "
            "python -m kimi.prepare --files YOUR_TEXT --out DIR (or --corpus shakespeare) and give that DIR"
        )
    try:
        ds = ShardDataset(split_dir, block_size, seed, verify=data_cfg.verify_shards)
    except ShardError as e:
        raise DataError(str(e)) from None
    _check_tokenizer(ds.manifest, data_cfg.tokenizer_name, split_dir)
    if ds.vocab_size > vocab_size:
        raise DataError(
            f"'{split_dir}' was tokenised with {ds.manifest.get('tokenizer')} (vocabulary {ds.vocab_size}) but "
            f"model.vocab_size={vocab_size}; set --model.vocab_size={ds.vocab_size} (or more, e.g. 50304)"
        )
    return ds


def _check_tokenizer(manifest: dict, name: str, split_dir: Path) -> None:
    """The configured tokenizer is the one the data was made with, else checkpoints would name the wrong
    decoder. File tokenizers (tiktoken:PATH, hf:PATH) are the same when their files' sha256 are, wherever
    the files now lie; a file edited since `kimi.prepare` is refused."""
    made_with, files = manifest.get("tokenizer"), manifest.get("tokenizer_files")
    if not made_with:
        return
    if files and split_spec(name):
        try:
            now = tokenizer_files(name)
        except TokenizerFileError as e:
            raise DataError(str(e)) from None
        if sorted(now.values()) == sorted(files.values()):
            return
        raise DataError(
            f"'{split_dir}' was tokenised with {made_with} (sha256 {sorted(files.values())}) but the files of "
            f"data.tokenizer_name='{name}' differ; point it at the same files, or re-run python -m kimi.prepare"
        )
    if made_with != name:
        raise DataError(
            f"'{split_dir}' was tokenised with '{made_with}' but data.tokenizer_name='{name}'; "
            f"set --data.tokenizer_name={made_with}"
        )


def _is_factory(spec: str) -> bool:
    """`package.module:factory` (and not a path that exists)."""
    module, colon, name = spec.partition(":")
    dotted = all(part.isidentifier() for part in module.split("."))
    return bool(colon) and dotted and name.isidentifier() and not Path(spec).exists()


def _from_factory(spec: str, block_size: int, vocab_size: int, seed: int, split: str) -> TokenDataset:
    """Call the user's dataset factory and check what it returns against the run's shape, in one line each."""
    module_name, _, name = spec.partition(":")
    hint = f"data.dataset={spec} should name a callable returning a kimi.data.TokenDataset"
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise DataError(f"{hint}, but module '{module_name}' cannot be imported ({e}); is it on PYTHONPATH?") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise DataError(f"{hint}, but '{module_name}' has no callable '{name}'")
    ds = factory(split=split, block_size=block_size, vocab_size=vocab_size, seed=seed)
    if not isinstance(ds, TokenDataset):
        raise DataError(f"{hint}, but {spec}(split={split!r}, ...) returned a {type(ds).__name__}")
    if ds.block_size != block_size or ds.vocab_size > vocab_size or ds.seed != seed:
        raise DataError(
            f"{spec} returned a dataset with block_size={ds.block_size}, vocab_size={ds.vocab_size}, "
            f"seed={ds.seed}; this run needs block_size={block_size}, vocab_size <= {vocab_size}, seed={seed}"
        )
    ds._check_size(f"{spec} ({split})")
    return ds
