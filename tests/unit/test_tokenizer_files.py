"""tiktoken:PATH and hf:PATH tokenizers, built here from files the tests write themselves (nothing fetched):
round trips, the eot conventions, the sidecar JSON, ids above 65,535, and one-line refusals."""

import base64
import json

import pytest

from kimi.data import tokenizer as tk
from kimi.data.tokenizer_files import TokenizerFileError, tokenizer_files

TEXT = "the cat sat on the mat.\nthe dog ate the hat. <|endoftext|> naïve 日本 😀\n"
SENTENCES = ["the cat sat on the mat.", "the dog ate the hat.", "a cat and a dog met on a mat.", "hello world"] * 20


def write_bpe(path, merges=(b"th", b"the", b"at", b" the", b".\n")):
    """256 single-byte tokens then `merges`, one '<base64> <rank>' line each (the tiktoken.model format)."""
    tokens = [bytes([b]) for b in range(256)] + list(merges)
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tokens)))
    return path


def write_hf(path, eos="<|endoftext|>"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [eos] if eos else []
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(SENTENCES, trainer)
    tok.save(str(path))
    return path


def fresh(name):
    tk._cached.cache_clear()  # the tests rewrite files under the same names
    return tk.get_tokenizer(name)


def test_tiktoken_file_round_trip_and_default_eot(tmp_path):
    enc = fresh(f"tiktoken:{write_bpe(tmp_path / 'tok.model')}")
    ids = enc.encode_ordinary(TEXT)
    assert enc.decode(ids) == TEXT
    assert enc.encode_ordinary("the") == [257]  # the merges apply
    assert enc.eot_token == 261 and enc.n_vocab == 262  # no JSON: <|endoftext|> right after the ranks
    assert 261 not in ids  # special-token text in data stays text
    assert enc.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [261]


def test_tiktoken_sidecar_json_sets_pattern_specials_and_eot_above_uint16(tmp_path):
    path = write_bpe(tmp_path / "tiktoken.model")
    specials = {"[BOS]": 70000, "[EOS]": 70001}
    (tmp_path / "tiktoken.model.json").write_text(
        json.dumps({"pat_str": r"\S+|\s+", "special_tokens": specials, "eot": "[EOS]"})
    )
    enc = fresh(f"tiktoken:{path}")
    assert enc.eot_token == 70001 and enc.n_vocab == 70002
    assert enc.encode_ordinary("a the") == [ord("a"), ord(" "), 257]  # " the" is not one piece under \S+|\s+
    assert enc.decode(enc.encode_ordinary(TEXT)) == TEXT
    assert not tk.chunkable(enc) and tk.chunkable(tk.get_tokenizer("byte"))
    assert set(tokenizer_files(f"tiktoken:{path}")) == {"tiktoken.model", "tiktoken.model.json"}


def test_hf_file_round_trip_and_eot(tmp_path):
    pytest.importorskip("tokenizers")
    enc = fresh(f"hf:{write_hf(tmp_path / 'tokenizer.json')}")
    ids = enc.encode_ordinary(TEXT)
    assert enc.decode(ids) == TEXT
    assert enc.eot_token == 0 and enc.eot_token not in ids  # the trainer puts specials first; text stays text
    assert enc.encode("x<|endoftext|>")[-1] == 0  # generate's prompts may name it
    assert enc.n_vocab == 1 + max(enc._tok.get_vocab().values()) > 256
    assert len(enc.encode_ordinary("the cat sat on the mat.")) < len("the cat sat on the mat.")  # merges apply


def test_hf_eot_from_tokenizer_config(tmp_path):
    pytest.importorskip("tokenizers")
    from tokenizers import AddedToken, Tokenizer

    path = write_hf(tmp_path / "tokenizer.json", eos=None)
    with pytest.raises(TokenizerFileError, match=r"no end-of-document token.*eos_token.*tokenizer_config\.json"):
        fresh(f"hf:{path}")
    tok = Tokenizer.from_file(str(path))
    tok.add_special_tokens([AddedToken("<|im_end|>", special=True)])
    tok.save(str(path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    enc = fresh(f"hf:{path}")
    assert enc.decode([enc.eot_token]) == "<|im_end|>"


@pytest.mark.parametrize(
    "kind,content,match",
    [
        ("tiktoken", "not base64 at all\n", r"tok: is not a tiktoken BPE file.*base64 token bytes"),
        ("hf", "{not json", r"tok: is not a Hugging Face tokenizer\.json"),
    ],
)
def test_unparsable_file_is_refused_in_one_line(tmp_path, kind, content, match):
    path = tmp_path / "tok"
    path.write_text(content)
    with pytest.raises(TokenizerFileError) as e:
        fresh(f"{kind}:{path}")
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    assert e.match(match.replace("tok:", "tok'"))


def test_bad_sidecar_and_missing_file_and_unknown_name(tmp_path):
    path = write_bpe(tmp_path / "t.model")
    (tmp_path / "t.model.json").write_text(json.dumps({"special_tokens": {"<|x|>": 300}}))
    with pytest.raises(TokenizerFileError, match=r'no end-of-document token; set "eot" in .*t\.model\.json'):
        fresh(f"tiktoken:{path}")
    with pytest.raises(TokenizerFileError, match="does not exist"):
        fresh(f"tiktoken:{tmp_path / 'nope'}")
    with pytest.raises(tk.TokenizerError, match="tiktoken:PATH, hf:PATH"):
        tk.get_tokenizer("sentencepiece:x")
