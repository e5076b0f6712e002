"""Bad input to the CLIs is one `error:` line on stderr and exit code 2, never a traceback and never a
silent run on nonsense: sampling settings, evaluation sizes, MLA widths that cannot work, QK-clip without
the logits it reads, and data preparation that would produce an empty split."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TRAIN = ["--config", "configs/debug.yaml", "--logging.mlflow=false", "--train.max_steps=1"]


def _one_error_line(module: str, *args: str) -> str:
    res = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300
    )
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (res.returncode, res.stderr)
    return lines[0]


@pytest.mark.parametrize(
    "module, args, needle",
    [
        ("kimi.generate", ["--max-new-tokens", "-5"], "--max-new-tokens=-5 must be >= 1"),
        ("kimi.generate", ["--temperature", "-1"], "--temperature=-1.0 must be >= 0 (0 = greedy)"),
        ("kimi.generate", ["--top-p", "0"], "--top-p=0.0 must be in (0, 1]"),
        ("kimi.generate", ["--top-k", "-3"], "--top-k=-3 must be >= 1, or 0 for no top-k filter"),
        ("kimi.evaluate", ["--data", "d", "--batches", "0"], "--batches=0 must be >= 1"),
        ("kimi.evaluate", ["--data", "d", "--batch-size", "0"], "--batch-size=0 must be >= 1"),
    ],
    ids=["gen-max-new-tokens", "gen-temperature", "gen-top-p", "gen-top-k", "eval-batches", "eval-batch-size"],
)
def test_sampling_and_eval_settings(tmp_path, module, args, needle):
    # The settings are checked before the checkpoint is opened: a missing one must not mask them.
    line = _one_error_line(module, "--checkpoint", str(tmp_path / "none"), *args)
    assert needle in line, line


@pytest.mark.parametrize(
    "override, needle",
    [
        ("--attention.kv_lora_rank=0", "attention.kv_lora_rank=0: MLA's keys and values come from this latent"),
        ("--attention.qk_rope_head_dim=0", "attention.qk_rope_head_dim=0: MLA sees token positions only"),
        ("--attention.track_max_logits=false", "--optim.qk_clip=false"),
        (
            "--data.tokenizer_name=llama",
            "data.tokenizer_name='llama' is not a tokenizer; use gpt2, byte, tiktoken:PATH",
        ),
    ],
    ids=["kv-lora-0", "rope-0", "qk-clip-without-maxima", "unknown-tokenizer"],
)
def test_config_that_would_train_nonsense(tmp_path, override, needle):
    line = _one_error_line("kimi.train", *TRAIN, f"--train.out_dir={tmp_path / 'o'}", override)
    assert needle in line, line
    assert not (tmp_path / "o" / "checkpoints").exists()


@pytest.mark.parametrize(
    "text, needle",
    [("", "the inputs hold no text (0 tokens"), ("tiny\n", "the val split holds no text (0 tokens); pass --val-files")],
    ids=["empty", "no-val"],
)
def test_prepare_refuses_an_empty_split(tmp_path, text, needle):
    (tmp_path / "in.txt").write_text(text)
    out = tmp_path / "data"
    line = _one_error_line("kimi.prepare", "--files", str(tmp_path / "in.txt"), "--out", str(out), "--no-progress")
    assert needle in line, line
    split = "train" if not text else "val"
    assert not (out / split / "manifest.json").exists()  # the empty split does not read as prepared


@pytest.mark.parametrize("what", ["train", "dist"])
def test_bench_with_a_missing_config(tmp_path, what):
    """`kimi.bench train --config nope.yaml` printed a traceback (dist: one per spawned rank)."""
    line = _one_error_line("kimi.bench", what, "--config", str(tmp_path / "nope.yaml"), "--steps", "1")
    assert "nope.yaml' does not exist" in line, line


def _tiny_pt(path: Path) -> Path:
    """A real nanoKimi .pt checkpoint ({"config", "model"}) of a one-layer model, for the data errors."""
    import dataclasses

    import torch

    from kimi.config import KimiConfig
    from kimi.model import KimiModel

    m = KimiModel(KimiConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=64, block_size=16))
    torch.save({"config": dataclasses.asdict(m.config), "model": m.state_dict()}, path)
    return path


def test_wrong_kind_of_path_gets_the_right_words(tmp_path):
    """Each was one line already, but said the wrong thing: /dev/null 'does not exist', a file as --out
    gave a raw errno, a file as --data suggested `--out` that file, a text file as --checkpoint repeated
    torch's weights_only paragraph."""
    readme, text = tmp_path / "README.md", tmp_path / "in.txt"
    readme.write_text("# not data\n")
    text.write_text("some text\n" * 50)
    prep = ["--no-progress", "--out", str(tmp_path / "d")]
    line = _one_error_line("kimi.prepare", "--files", "/dev/null", *prep)
    assert "'/dev/null' is not a regular file or folder" in line, line
    line = _one_error_line("kimi.prepare", "--files", str(text), "--no-progress", "--out", str(readme))
    assert f"--out {readme} is a file; give a directory" in line and "Errno" not in line, line
    line = _one_error_line("kimi.prepare", "--files", str(text), "--no-progress", "--out", str(readme / "sub"))
    assert f"--out {readme / 'sub'}: {readme} is a file; give a directory" in line, line
    line = _one_error_line("kimi.evaluate", "--checkpoint", str(_tiny_pt(tmp_path / "m.pt")), "--data", str(readme))
    assert f"'{readme}' is a file, not a prepared dataset directory (no val/manifest.json)" in line, line
    assert "--out " + str(readme) not in line, line
    line = _one_error_line("kimi.evaluate", "--checkpoint", str(tmp_path / "m.pt"), "--data", str(tmp_path))
    assert f"'{tmp_path}' is not a prepared dataset directory (no val/manifest.json); prepare one" in line, line
    line = _one_error_line("kimi.generate", "--checkpoint", str(readme))
    assert f"'{readme}' is not a nanoKimi checkpoint" in line and "weights_only" not in line, line


def test_fused_elementwise_without_a_compiler(tmp_path):
    """train.fused_elementwise compiles C++ kernels on CPU; with no compiler on the path (CXX names one that
    does not exist) the run stops at start with one line, not at the first forward with inductor's traceback."""
    env = {**ENV, "CXX": "no-such-c++-compiler"}
    args = [*TRAIN, f"--train.out_dir={tmp_path / 'o'}", "--train.fused_elementwise=true"]
    res = subprocess.run(
        [sys.executable, "-m", "kimi.train", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1, (res.returncode, res.stderr)
    assert "no C++ compiler was found" in lines[0] and "--train.fused_elementwise=false" in lines[0], lines[0]
