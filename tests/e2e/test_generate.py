"""Generation (latent cache vs full recompute), the generate/evaluate CLIs, and their one-line errors."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kimi import load_model
from kimi.config import KimiConfig, load_config
from kimi.evaluate import ModelEvaluator
from kimi.generate import Generator, PromptError
from kimi.generate import main as generate_main
from kimi.model import KimiModel
from kimi.train import train

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("attention", ["mla", "mha"])
def test_greedy_same_with_and_without_cache(attention):
    torch.manual_seed(0)
    cfg = KimiConfig(
        n_layer=2,
        n_head=4,
        n_embd=64,
        vocab_size=97,
        block_size=48,
        attention={
            "type": attention,
            "kv_lora_rank": 32,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8,
            "v_head_dim": 16,
        },
        moe={"num_experts": 4, "top_k": 2, "expert_hidden": 32},
    )
    model = KimiModel(cfg)
    with torch.no_grad():  # sharpen the logits so greedy choices are not near-ties
        model.lm_head.weight.mul_(20)
    gen = Generator(model)
    prompt = [3, 14, 15, 92, 65]
    cached = gen.generate(prompt, 30, temperature=0, use_cache=True)
    full = gen.generate(prompt, 30, temperature=0, use_cache=False)
    assert cached == full and len(cached) == 30
    assert len(set(cached)) > 1  # not a degenerate constant stream
    # Sampling is reproducible with a seed.
    a = gen.generate(prompt, 10, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    assert a == gen.generate(prompt, 10, temperature=1.0, top_k=20, top_p=0.9, seed=7)


def test_prompt_errors():
    model = KimiModel(KimiConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=50, block_size=16, moe={"use_moe": False}))
    gen = Generator(model)
    with pytest.raises(PromptError, match="context is 16"):
        gen.generate(list(range(16)), 5)
    with pytest.raises(PromptError, match="smaller than the gpt2 tokenizer"):
        gen.generate_text("hello")


def test_generate_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        generate_main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for default in ("(default: 200)", "(default: 0.8)", "(default: auto)", "(default: '\\n')"):
        assert default in out, default


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    """A tiny model with the GPT-2 vocabulary trained 3 steps on a prepared text file."""
    tmp = tmp_path_factory.mktemp("gen")
    text = tmp / "story.txt"
    text.write_text("ROMEO: But soft, what light through yonder window breaks?\n" * 200)
    subprocess.run(
        [sys.executable, "-m", "kimi.prepare", "--files", str(text), "--out", str(tmp / "data"), "--no-progress"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    cfg = load_config(
        ROOT / "configs" / "debug.yaml",
        [
            f"--train.out_dir={tmp / 'run'}",
            "--logging.mlflow=false",
            "--model.vocab_size=50257",
            "--model.n_embd=64",
            "--model.tie_embeddings=true",
            f"--data.dataset={tmp / 'data'}",
            "--train.max_steps=3",
            "--train.eval_interval=0",
        ],
    )
    train(cfg)
    return tmp


def test_generate_cli(gpt2_run):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "kimi.generate",
            "--checkpoint",
            str(gpt2_run / "run"),
            "--prompt",
            "ROMEO:",
            "--max-new-tokens",
            "8",
            "--seed",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ROMEO:") and len(res.stdout) > len("ROMEO:\n")
    bad = subprocess.run(
        [sys.executable, "-m", "kimi.generate", "--checkpoint", str(gpt2_run / "nope")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and len(bad.stderr.strip().splitlines()) == 1


def test_interactive_session_survives_empty_lines(gpt2_run):
    """An empty or blank line asks again; 'quit' ends the session with exit code 0; EOF too."""
    args = [sys.executable, "-m", "kimi.generate", "--checkpoint", str(gpt2_run / "run"), "--interactive"]
    args += ["--max-new-tokens", "3", "--seed", "1"]
    res = subprocess.run(
        args, cwd=ROOT, input="ROMEO:\n\n   \nJULIET:\nquit\nNEVER:\n", capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    assert "error" not in res.stderr
    out = res.stdout
    assert "ROMEO:" in out and "JULIET:" in out and "NEVER:" not in out
    assert out.count("prompt> ") == 5  # ROMEO, the empty line, the blank one, JULIET, quit
    eof = subprocess.run(args, cwd=ROOT, input="\nROMEO:\n", capture_output=True, text=True, timeout=300)
    assert eof.returncode == 0 and "ROMEO:" in eof.stdout, eof.stderr


def test_evaluate_cli_and_api(gpt2_run):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "kimi.evaluate",
            "--checkpoint",
            str(gpt2_run / "run"),
            "--data",
            str(gpt2_run / "data"),
            "--batches",
            "2",
            "--batch-size",
            "2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "perplexity" in res.stdout
    from kimi.config import DataConfig
    from kimi.data.dataset import build_dataset

    model = load_model(str(gpt2_run / "run"))
    ds = build_dataset(DataConfig(dataset=str(gpt2_run / "data")), 64, 50257, seed=0, split="val")
    out = ModelEvaluator(batch_size=2, num_batches=2).evaluate_perplexity(model, ds)
    assert out["tokens"] == 2 * 2 * 64
    assert abs(out["perplexity"] - torch.tensor(out["loss"]).exp().item()) < 1e-3 * out["perplexity"]


def test_byte_tokenizer_end_to_end(tmp_path):
    """prepare --tokenizer byte -> train (vocab 257) -> the checkpoint names its tokenizer -> generate decodes
    bytes; training with the wrong data.tokenizer_name is refused in one line."""
    text = tmp_path / "story.txt"
    text.write_text("ROMEO: But soft, what light through yonder window breaks?\n" * 100)
    data = tmp_path / "data"
    subprocess.run(
        [sys.executable, "-m", "kimi.prepare", "--files", str(text), "--out", str(data), "--tokenizer", "byte"]
        + ["--no-progress"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    args = [
        sys.executable, "-m", "kimi.train", "--config", "configs/debug.yaml", f"--out-dir={tmp_path / 'run'}",
        "--logging.mlflow=false", "--model.vocab_size=257", f"--data.dataset={data}", "--train.max_steps=2",
    ]  # fmt: skip
    bad = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "tokenised with 'byte'" in bad.stderr and "--data.tokenizer_name=byte" in bad.stderr
    res = subprocess.run([*args, "--data.tokenizer_name=byte"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    gen = subprocess.run(
        [sys.executable, "-m", "kimi.generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "ROMEO:"]
        + ["--max-new-tokens", "12", "--seed", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert gen.returncode == 0, gen.stderr
    # 12 new byte tokens decode to at most 12 characters (fewer when bytes form multi-byte or invalid UTF-8)
    assert gen.stdout.startswith("ROMEO:") and 0 < len(gen.stdout.rstrip("\n")) - len("ROMEO:") <= 12
    # --to-hf on the run writes the tokenizer it was trained with (no --tokenizer needed): AutoTokenizer reads bytes
    hf = tmp_path / "hf"
    conv = subprocess.run([sys.executable, "-m", "kimi.convert", "--to-hf", str(tmp_path / "run"), str(hf)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert conv.returncode == 0, conv.stderr
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    assert tok("ROMEO:").input_ids == list(b"ROMEO:") and tok.eos_token_id == 256


def test_padded_vocabulary_never_samples_undecodable_ids():
    """A model vocabulary padded past its tokenizer's (byte: 257 ids, here 320 rows) whose padding rows win
    every argmax: generate_text samples only ids the tokenizer can decode instead of crashing in decode()."""
    from kimi.data.tokenizer import get_tokenizer

    torch.manual_seed(0)
    model = KimiModel(load_config(ROOT / "configs" / "debug.yaml", ["--model.vocab_size=320"]).model)
    with torch.no_grad():
        model.lm_head.weight[257:] = 0.0
        model.lm_head.weight[257:, 0] = 1e4  # the padding rows dominate any hidden state with h[0] > 0
    gen = Generator(model, tokenizer=get_tokenizer("byte"), tokenizer_name="byte")
    text = gen.generate_text("ROMEO:", max_new_tokens=8, temperature=0.8, seed=1)
    assert isinstance(text, str)
    assert max(gen.generate(list(b"ROMEO:"), 8, temperature=0)) >= 257  # the raw ids would have been padding
