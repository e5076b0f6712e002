"""A user's own TokenDataset trains through the CLI (`data.dataset=package.module:factory`) and the Python API
(`train(cfg, train_set=...)`), resumes by its identity, and a bad factory is refused in one line."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kimi.config import load_config
from kimi.data import TokenDataset
from kimi.train import train

ROOT = Path(__file__).resolve().parents[2]
HERE = "tests.e2e.test_custom_dataset"


class Arithmetic(TokenDataset):
    """Token t of the stream is (7 t) mod 97: a learnable sequence, no files."""

    def __init__(self, split: str, block_size: int, vocab_size: int, seed: int):
        self.split, self.block_size, self.seed = split, block_size, seed
        self.vocab_size = min(vocab_size, 97)
        self.num_tokens = 20_000 if split == "train" else 2_000

    def _tokens(self, starts: np.ndarray) -> np.ndarray:
        offsets = starts[:, None] + np.arange(self.block_size + 1) + (0 if self.split == "train" else 10**6)
        return (offsets * 7 % self.vocab_size).astype(np.int64)

    def identity(self) -> dict:
        return {"kind": "arithmetic", "split": self.split, "num_tokens": self.num_tokens}


def make(split, block_size, vocab_size, seed):
    return Arithmetic(split, block_size, vocab_size, seed)


def not_a_dataset(**kwargs):
    return [1, 2, 3]


def wrong_window(split, block_size, vocab_size, seed):
    return Arithmetic(split, block_size + 1, vocab_size, seed)


def _train_cli(out, *extra):
    cmd = [sys.executable, "-m", "kimi.train", "--config", "configs/debug.yaml", f"--out-dir={out}",
           "--logging.mlflow=false", "--train.eval_interval=2", *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_factory_trains_and_resumes_through_the_cli(tmp_path):
    out = tmp_path / "run"
    p = _train_cli(out, f"--data.dataset={HERE}:make", "--max-steps=2")
    assert p.returncode == 0, p.stderr[-2000:]
    p = _train_cli(out, f"--data.dataset={HERE}:make", "--max-steps=4")  # resumes: same identity
    assert p.returncode == 0 and "resumed from" in p.stdout, p.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and "val_loss" in rows[3]
    assert rows[3]["loss"] < rows[0]["loss"]
    p = _train_cli(out, "--data.dataset=toy", "--max-steps=5")  # another dataset: refused in one line
    assert p.returncode == 2 and "different dataset" in p.stderr and p.stderr.count("\n") == 1


def test_api_takes_dataset_objects(tmp_path):
    cfg = load_config(ROOT / "configs" / "debug.yaml",
                      [f"--train.out_dir={tmp_path}", "--logging.mlflow=false", "--train.max_steps=2",
                       "--train.eval_interval=2"])  # fmt: skip
    ds = make("train", cfg.block_size, cfg.model.vocab_size, cfg.train.seed)
    val = make("val", cfg.block_size, cfg.model.vocab_size, cfg.train.seed)
    row = train(cfg, train_set=ds, val_set=val)
    assert row["step"] == 2 and "val_loss" in row


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("no_such_pkg.data:make", "module 'no_such_pkg.data' cannot be imported"),
        (f"{HERE}:nothing_here", f"'{HERE}' has no callable 'nothing_here'"),
        (f"{HERE}:not_a_dataset", "returned a list"),
        (f"{HERE}:wrong_window", "this run needs block_size=64"),
    ],
)
def test_bad_factory_is_one_line(tmp_path, spec, needle):
    p = _train_cli(tmp_path / "run", f"--data.dataset={spec}", "--max-steps=1")
    assert p.returncode == 2 and needle in p.stderr and p.stderr.count("\n") == 1, p.stderr[-2000:]
