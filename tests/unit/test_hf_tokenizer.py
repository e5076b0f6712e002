"""nanoKimi's tokenizers written as Hugging Face fast tokenizers (`kimi.convert --to-hf`): the same ids as
tiktoken on varied text, and `transformers.pipeline` on the export gives kimi.generate's greedy text."""

import base64
import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kimi.config import KimiConfig  # noqa: E402
from kimi.convert import main as convert_main  # noqa: E402
from kimi.data import tokenizer as tk  # noqa: E402
from kimi.data.hf_tokenizer import tiktoken_to_hf_json  # noqa: E402
from kimi.data.tokenizer_files import KIMI_PATTERN  # noqa: E402
from kimi.generate import Generator  # noqa: E402
from kimi.model import KimiModel  # noqa: E402

TEXTS = [
    "Hello world",
    "  leading spaces and\n\nnewlines\t tabs \n \n",
    "It's 12345678 o'clock; DON'T shout!! ...",
    "naïve émoji 🤖 日本語のテキスト 中文 Ünïcödé",
    "x" * 60 + " aaaa bbbb",
    "<|endoftext|> special text, [EOS] too",
    "def f(x):\n    return x ** 2  # code\n",
]


def k2_style_file(tmp_path):
    """A tiktoken.model with merges learned from GPT-2's ranks (its first 3,000 tokens), K2's pattern, and
    special tokens past a gap in the ids, as K2's [BOS]/[EOS] are."""
    gpt2 = tk.get_tokenizer("gpt2")._mergeable_ranks
    tokens = sorted(gpt2, key=gpt2.get)[:3000]
    path = tmp_path / "tiktoken.model"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tokens)))
    specials = {"[BOS]": 3010, "[EOS]": 3011}
    (tmp_path / "tiktoken.model.json").write_text(json.dumps({"pat_str": KIMI_PATTERN, "special_tokens": specials,
                                                               "eot": "[EOS]"}))  # fmt: skip
    tk._cached.cache_clear()
    return f"tiktoken:{path}"


@pytest.mark.parametrize("which", ["gpt2", "byte", "k2_file"])
def test_same_ids_as_tiktoken(tmp_path, which):
    from tokenizers import Tokenizer

    name = k2_style_file(tmp_path) if which == "k2_file" else which
    enc = tk.get_tokenizer(name)
    hf = Tokenizer.from_str(tiktoken_to_hf_json(enc))
    for text in TEXTS:
        ids = enc.encode(text, allowed_special="all")
        assert hf.encode(text, add_special_tokens=False).ids == ids, text
        assert hf.decode(ids, skip_special_tokens=False) == enc.decode(ids), text
    assert hf.token_to_id(enc.decode([enc.eot_token])) == enc.eot_token


def tiny_model(vocab_size: int, seed: int = 0) -> KimiModel:
    torch.manual_seed(seed)
    cfg = KimiConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=vocab_size, block_size=64, intermediate_size=64,
                     moe={"num_experts": 4, "top_k": 2}, attention={"kv_lora_rank": 16, "qk_nope_head_dim": 8,
                                                                     "qk_rope_head_dim": 8, "v_head_dim": 8})  # fmt: skip
    model = KimiModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # spread the logits: greedy picks far from ties
    return model


@pytest.mark.parametrize("which,vocab", [("gpt2", 50304), ("k2_file", 3072)])
def test_pipeline_gives_kimi_generate_text(tmp_path, which, vocab):
    """Vocabularies padded past the tokenizer (GPT-2 in 50,304 rows, 3,012 ids in 3,072): the padding rows
    never win, on both sides (HF: generation_config.json's suppress_tokens)."""
    name = k2_style_file(tmp_path) if which == "k2_file" else which
    model, n_vocab, ours = tiny_model(vocab), tk.get_tokenizer(name).n_vocab, None
    ours = Generator(model, tokenizer_name=name)
    with torch.no_grad():  # padding rows that would win every step they are not suppressed
        logits = model(torch.tensor([ours.tokenizer.encode("The cat sat")])).logits[0, -1]
        assert logits.max() > 0
        model.lm_head.weight[n_vocab:] = 2 * model.lm_head.weight[logits[:n_vocab].argmax()]
    torch.save({"config": {"model": dataclasses.asdict(model.config)}, "model": model.state_dict()}, tmp_path / "m.pt")
    assert convert_main(["--to-hf", str(tmp_path / "m.pt"), str(tmp_path / "hf"), "--tokenizer", name]) == 0
    pipe = transformers.pipeline("text-generation", model=str(tmp_path / "hf"), device="cpu")
    assert pipe.tokenizer.eos_token_id == tk.get_tokenizer(name).eot_token
    for prompt in ("The cat sat", "日本 and 12 numbers", "x"):
        want = ours.generate_text(prompt, max_new_tokens=24, temperature=0)
        got = pipe(prompt, max_new_tokens=24, do_sample=False, return_full_text=False)[0]["generated_text"]
        assert got == want and len(want) > 10, (prompt, got, want)


def test_tokenizer_larger_than_the_model_is_refused(tmp_path, capsys):
    model = tiny_model(257)
    torch.save({"config": {"model": dataclasses.asdict(model.config)}, "model": model.state_dict()}, tmp_path / "m.pt")
    assert convert_main(["--to-hf", str(tmp_path / "m.pt"), str(tmp_path / "hf"), "--tokenizer", "gpt2"]) == 2
    err = capsys.readouterr().err
    assert "50257 tokens but the model only 257" in err and err.count("\n") == 1


def add_k2_tokenizer(d, src) -> None:
    """K2's tokenizer files in HF folder d: tiktoken.model (built in src) and a tokenizer_config.json with
    its special tokens, eos and the auto_map to Moonshot's tokenization code (3,012 tokens)."""
    src.mkdir(exist_ok=True)
    k2_style_file(src)
    (d / "tiktoken.model").write_bytes((src / "tiktoken.model").read_bytes())
    added = {"3010": {"content": "[BOS]", "special": True}, "3011": {"content": "[EOS]", "special": True}}
    config = {"auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
              "added_tokens_decoder": added, "eos_token": "[EOS]", "bos_token": "[BOS]"}  # fmt: skip
    (d / "tokenizer_config.json").write_text(json.dumps(config))


def hf_checkpoint_with_tokenizer(tmp_path, kind: str, vocab_size: int = 3072):
    """A tiny HF DeepSeek-V3 folder with the tokenizer files a K2 (tiktoken) or an HF-tokenizer release has."""
    from tests.unit.test_hf_parity import hf_config, random_hf_model

    d = tmp_path / "hf"
    random_hf_model(hf_config(None, vocab_size=vocab_size)).save_pretrained(d)
    src = tmp_path / "src"
    if kind == "tiktoken":
        add_k2_tokenizer(d, src)
    else:
        from tests.unit.test_tokenizer_files import write_hf

        write_hf(d / "tokenizer.json")
    return d


@pytest.mark.parametrize("kind", ["tiktoken", "tokenizer.json"])
def test_from_hf_takes_the_checkpoints_tokenizer_along(tmp_path, kind):
    """--from-hf puts the tokenizer beside OUT.pt, generate decodes with it, and --to-hf of that .pt writes it."""
    from kimi.generate import load_generator

    d = hf_checkpoint_with_tokenizer(tmp_path, kind)
    assert convert_main(["--from-hf", str(d), str(tmp_path / "k.pt")]) == 0
    tk._cached.cache_clear()
    gen = load_generator(str(tmp_path / "k.pt"))
    text = "the cat sat on the mat. 日本語 It's 1234!"
    if kind == "tiktoken":
        assert gen.tokenizer.eot_token == 3011 and gen.tokenizer._pat_str == KIMI_PATTERN
        assert gen.tokenizer.encode_ordinary(text) == tk.get_tokenizer(k2_style_file(tmp_path / "src")).encode_ordinary(
            text
        )
    assert gen.tokenizer.decode(gen.tokenizer.encode_ordinary(text)) == text
    assert convert_main(["--to-hf", str(tmp_path / "k.pt"), str(tmp_path / "back")]) == 0
    back = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert back(text).input_ids == gen.tokenizer.encode_ordinary(text)
    assert back.eos_token_id == gen.tokenizer.eot_token


def test_from_hf_refuses_a_tokenizer_it_cannot_read_or_that_outgrows_the_model(tmp_path, capsys):
    d = hf_checkpoint_with_tokenizer(tmp_path, "tiktoken", vocab_size=1024)  # 3,012 tokens, 1,024 rows
    capsys.readouterr()  # save_pretrained's progress bar
    assert convert_main(["--from-hf", str(d), str(tmp_path / "k.pt")]) == 2
    err = capsys.readouterr().err
    assert "3012 tokens but config.json's vocab_size is 1024" in err and err.count("\n") == 1
    assert not (tmp_path / "k.pt").exists() and not (tmp_path / "k.pt.tokenizer").exists()
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "auto_map": {"AutoTokenizer": ["mine.Tok", None]}}))
    assert convert_main(["--from-hf", str(d), str(tmp_path / "k.pt")]) == 2
    err = capsys.readouterr().err
    assert "pre-tokenizer pattern lives in tokenizer code" in err and err.count("\n") == 1
