"""Regenerate tests/golden/debug_losses.json: `python tests/golden/make_golden.py`.

Only when a change is meant to alter training numerics; say so in the commit message.
"""

import json
import tempfile
from pathlib import Path

import torch

from kimi.config import load_config
from kimi.train import train

ROOT = Path(__file__).resolve().parents[2]

if __name__ == "__main__":
    out = Path(tempfile.mkdtemp()) / "run"
    args = [f"--train.out_dir={out}", "--logging.mlflow=false", "--train.max_steps=20", "--train.eval_interval=0"]
    train(load_config(ROOT / "configs" / "debug.yaml", args))
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    about = "configs/debug.yaml, 20 steps, one CPU process, fp32, toy data; made by tests/golden/make_golden.py"
    golden = {"about": about, "torch": torch.__version__, "losses": losses}
    (ROOT / "tests" / "golden" / "debug_losses.json").write_text(json.dumps(golden, indent=1) + "\n")
