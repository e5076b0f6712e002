"""train() on a data.mix of two prepared datasets: mix_frac/<name>, mix_epochs/<name> and val_loss/<name> in
metrics.jsonl, a bit-exact resume, and a changed mixture on resume said in one line."""

import json

import numpy as np

from kimi.config import load_config
from kimi.data.mixture import build_data
from kimi.train import train
from tests.dist_utils import run_distributed
from tests.e2e.test_train import DEBUG
from tests.unit.test_data import make_split


def _data(tmp_path):
    for i, name in enumerate(("web", "code")):
        tokens = np.random.default_rng(i).integers(0, 512, 4000)
        for split in ("train", "val"):
            make_split(tmp_path / name / split, tokens, 1500, vocab_size=512, corpus=name, split=split)
    return tmp_path / "web", tmp_path / "code"


def _cfg(out, mix, *extra):
    return load_config(DEBUG, [f"--train.out_dir={out}", "--logging.mlflow=false", "--train.eval_interval=0",
                               f"--data.mix={mix}", "--train.max_steps=4", "--train.log_interval=2", *extra])  # fmt: skip


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_mixture_trains_logs_fractions_and_resumes_bit_exact(tmp_path, capsys):
    web, code = _data(tmp_path)
    mix = f"{web}:0.75,{code}:0.25"
    train(_cfg(tmp_path / "full", mix, "--train.eval_interval=4"))
    rows = _rows(tmp_path / "full")
    assert [r["step"] for r in rows] == [1, 2, 4]  # the first, every log_interval=2, the last
    cfg = _cfg(tmp_path, mix)
    ds, g = build_data(cfg.data, cfg.block_size, 512, cfg.train.seed), cfg.train.global_batch_size
    for r, since in zip(rows, ([1], [2], [3, 4])):  # each logged step: the share since the last logged one
        web_n, code_n = np.sum([ds.source_counts(s, g) for s in since], axis=0)
        assert r["mix_frac/web"] == web_n / (web_n + code_n) and r["mix_frac/code"] == code_n / (web_n + code_n)
    seen = np.sum([ds.source_counts(s, g) for s in range(1, 5)], axis=0)  # epochs: windows x 64 tokens / 4000
    assert [rows[-1]["mix_epochs/web"], rows[-1]["mix_epochs/code"]] == (seen * 64 / 4000).tolist()
    last = rows[-1]  # validation: each source's own val split, and their mean weighted as training draws them
    assert last["val_loss"] == 0.75 * last["val_loss/web"] + 0.25 * last["val_loss/code"]
    assert last["val_loss/web"] != last["val_loss/code"]
    part = tmp_path / "part"
    assert train(_cfg(part, mix, "--train.eval_interval=4"), stop_after=2)["preempted"]
    train(_cfg(part, mix, "--train.eval_interval=4"))
    full_loss = {r["step"]: r["loss"] for r in rows}
    part_rows = _rows(part)
    part_loss = {r["step"]: r["loss"] for r in part_rows}
    assert list(part_loss) == [1, 2, 3, 4]  # the first step after a resume is logged too
    assert all(part_loss[s] == full_loss[s] for s in full_loss)  # bit for bit
    for key in ("mix_epochs/web", "val_loss/web", "val_loss"):  # epochs seen ride in the checkpoint
        assert part_rows[-1][key] == last[key], key
    assert "data mixture changed" not in capsys.readouterr().out


def test_changed_mixture_on_resume_is_said(tmp_path, capsys):
    web, code = _data(tmp_path)
    out = tmp_path / "run"
    train(_cfg(out, f"{web}:0.75,{code}:0.25"), stop_after=2)
    capsys.readouterr()
    train(_cfg(out, f"{web}:0.5,{code}:0.5"))
    printed = capsys.readouterr().out
    assert "data mixture changed on resume: web:0.75, code:0.25 -> web:0.5, code:0.5" in printed
    assert [r["step"] for r in _rows(out)] == [1, 2, 3, 4]


def _train_rank(rank, world, out, mix):
    return train(_cfg(out, mix))["loss"]


def test_world_2_trains_the_same_mixture(tmp_path):
    """Each rank draws only its slice of a step's windows (4 of 8), yet the two ranks together train what one
    process does with all 8 in one micro-batch: the same losses (summed in another order: 2e-5 relative) and the same mix_frac rows."""
    web, code = _data(tmp_path)
    mix = f"{web}:0.75,{code}:0.25"
    train(_cfg(tmp_path / "one", mix, "--train.micro_batch_size=8"))  # one micro-batch: all 8 windows at once
    run_distributed(_train_rank, 2, args=(str(tmp_path / "two"), mix), timeout=300)
    one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= 2e-5 * abs(a["loss"]), (a["step"], a["loss"], b["loss"])
        assert {k: v for k, v in a.items() if k.startswith("mix_")} == {
            k: v for k, v in b.items() if k.startswith("mix_")
        }
