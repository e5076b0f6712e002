"""The training loop end to end on one CPU process: metrics, checkpoints, exact resume, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kimi.checkpoint import CheckpointStore, resolve
from kimi.config import load_config
from kimi.engine import read_model_state as load_model_state
from kimi.train import train

ROOT = Path(__file__).resolve().parents[2]
DEBUG = ROOT / "configs" / "debug.yaml"


def _cfg(out: Path, *extra: str):
    return load_config(
        DEBUG,
        [f"--train.out_dir={out}", "--logging.mlflow=false", "--train.eval_interval=4", *extra],
    )


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_metrics_and_checkpoints(tmp_path):
    out = tmp_path / "run"
    row = train(_cfg(out, "--train.max_steps=6", "--train.ckpt_interval=2", "--train.keep_last=2"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "lr", "tokens_per_s", "grad_norm", "max_attn_logit", "expert_imbalance"):
        assert key in rows[0], key
    assert "mfu" not in rows[0]  # a CPU has no datasheet peak: no guessed MFU (kimi.bench throughput measures one)
    assert "val_loss" in rows[3] and "val_loss" in rows[5] and "val_loss" not in rows[2]
    assert row["step"] == 6
    ckpts = out / "checkpoints"
    steps = sorted(p.name for p in ckpts.glob("step_*"))
    assert (ckpts / "latest").resolve().name == "step_000006"
    best = (ckpts / "best").resolve().name
    assert steps == ["step_000004", "step_000006"] and best in steps  # keep_last=2; best never rotated out
    meta = json.loads((ckpts / "latest" / "meta.json").read_text())
    assert meta["step"] == 6 and meta["tokenizer"] == "gpt2" and "git_commit" in meta
    assert "model:" in (ckpts / "latest" / "config.yaml").read_text()


@pytest.mark.parametrize("fused", ["false", "true"], ids=["eager", "fused-elementwise"])
def test_resume_is_bit_exact(tmp_path, fused):
    full, part = tmp_path / "full", tmp_path / "part"
    steps = ["--train.max_steps=8", f"--train.fused_elementwise={fused}"]
    train(_cfg(full, *steps))
    # Stopped after step 3 as a preempted run would be (checkpoint, then exit) ...
    assert train(_cfg(part, *steps), stop_after=3)["preempted"]
    assert list(_losses(part)) == [1, 2, 3]
    # ... and resumed automatically (the out_dir holds a checkpoint) to the end.
    train(_cfg(part, *steps))
    a, b = _losses(full), _losses(part)
    assert list(b) == list(range(1, 9))
    assert [a[s] for s in range(1, 9)] == [b[s] for s in range(1, 9)]  # bit for bit
    sd_a = load_model_state(full / "checkpoints" / "latest")[1]
    sd_b = load_model_state(part / "checkpoints" / "latest")[1]
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k


def test_leftover_tmp_is_never_latest(tmp_path):
    out = tmp_path / "run"
    train(_cfg(out, "--train.max_steps=2"))
    ckpts = out / "checkpoints"
    # A save killed half-way leaves a .tmp directory; it must not be picked up, and the next save cleans it.
    (ckpts / "step_000003.tmp").mkdir()
    assert CheckpointStore(ckpts).latest().name == "step_000002"
    assert resolve(out).name == "step_000002"
    train(_cfg(out, "--train.max_steps=3"))
    assert not (ckpts / "step_000003.tmp").exists()
    assert CheckpointStore(ckpts).latest().name == "step_000003"


def _cli(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "kimi.train", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--config", "configs/nope.yaml"], "does not exist"),
        (["--config", "configs/debug.yaml", "--moe.num_expert=4"], "did you mean 'num_experts'"),
        (["--config", "configs/debug.yaml", "--train.max_steps=ten"], "should be an integer"),
        (["--config", "configs/debug.yaml", "--data.dataset=/nonexistent/dir"], "kimi.prepare"),
    ],
)
def test_bad_input_is_one_line(tmp_path, args, needle):
    res = _cli(*args, f"--train.out_dir={tmp_path / 'o'}", "--logging.mlflow=false")
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], res.stderr


def test_incompatible_checkpoint_is_one_line(tmp_path):
    out = tmp_path / "run"
    train(_cfg(out, "--train.max_steps=1"))
    res = _cli(
        "--config",
        "configs/debug.yaml",
        f"--train.out_dir={out}",
        "--logging.mlflow=false",
        "--train.max_steps=2",
        "--model.n_embd=96",
    )
    assert res.returncode == 2
    assert res.stderr.strip().startswith("error:") and "different config" in res.stderr


def test_resume_with_torn_metrics_line_and_new_schedule(tmp_path):
    import signal

    before = signal.getsignal(signal.SIGTERM)
    out, fresh = tmp_path / "run", tmp_path / "fresh"
    train(_cfg(out, "--train.max_steps=3"))
    assert signal.getsignal(signal.SIGTERM) is before  # train() gives the signals back
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 5.1')  # a kill in the middle of a write
    train(_cfg(out, "--train.max_steps=5"))  # resumes, and follows the 5-step schedule from here on
    train(_cfg(fresh, "--train.max_steps=5"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (fresh / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[3]["lr"] == ref[3]["lr"] and rows[4]["lr"] == ref[4]["lr"]


def test_bad_train_knobs_are_config_errors():
    from kimi.config import ConfigError

    for bad in ("--train.log_interval=0", "--train.eval_batches=0"):
        with pytest.raises(ConfigError):
            load_config(DEBUG, [bad, "--train.eval_interval=5"])


def test_rerun_of_a_finished_run_says_so(tmp_path, capsys):
    """A finished run started again trains nothing and says what to do, instead of 'done: 0 steps | final loss nan'."""
    out = tmp_path / "run"
    train(_cfg(out, "--train.max_steps=2", "--train.eval_interval=0"))
    capsys.readouterr()
    row = train(_cfg(out, "--train.max_steps=2", "--train.eval_interval=0"))
    said = capsys.readouterr().out
    assert row == {"step": 2} and "nothing to train" in said and "raise --max-steps" in said and "nan" not in said


def test_first_step_and_saves_are_printed(tmp_path, capsys):
    """The first step is logged whatever log_interval is (no silent minutes on CPU), and each save says so."""
    train(_cfg(tmp_path / "run", "--train.max_steps=3", "--train.log_interval=10", "--train.eval_interval=0"))
    said = capsys.readouterr().out
    assert "step     1/3" in said and "step     3/3" in said and "step     2/3" not in said
    assert "checkpoint: step 3 ->" in said


def test_warmup_longer_than_the_run_is_said(tmp_path, capsys):
    """optim.warmup_steps > train.max_steps used to pass silently: the lr never reaches optim.lr. It is
    said in one line, not refused: short smoke runs of real configs (nano's 100-step warmup under
    `--train.max_steps=5`, debug's 2 under `--train.max_steps=1`) are legitimate and widely used."""
    train(_cfg(tmp_path / "a", "--train.max_steps=1", "--train.eval_interval=0"))
    out = capsys.readouterr().out
    note = "note: optim.warmup_steps=2 > train.max_steps=1: the lr peaks at 50% of optim.lr=0.003"
    assert sum(note in line for line in out.splitlines()) == 1, out
    train(_cfg(tmp_path / "b", "--train.max_steps=2", "--train.eval_interval=0"))
    assert "optim.warmup_steps" not in capsys.readouterr().out  # warmup == max_steps reaches the peak
