"""Any tokenizer nanoKimi trains with, written as a Hugging Face fast tokenizer (`tokenizer.json` +
`tokenizer_config.json`), so `AutoTokenizer.from_pretrained` on a `kimi.convert --to-hf` folder encodes and
decodes exactly as `kimi.generate` does.

    gpt2, byte, tiktoken:PATH   tiktoken BPE -> a byte-level `tokenizers` BPE: the same ranks as its vocabulary,
                                merges recovered from the ranks, the same pre-tokenizer regex, the same
                                special tokens at the same ids
    hf:PATH                     already one: its tokenizer.json (and tokenizer_config.json) copied

Recovering merges: tiktoken stores only token -> rank and merges, at each step, the adjacent pair whose
concatenation has the lowest rank. A byte-level BPE with one merge per way of splitting each token into two
tokens, ordered by the rank of the result, makes the same choices; `ignore_merges` takes a pre-token that is
itself a token whole, as tiktoken does (same ids, fewer merge steps). tests/unit/test_hf_tokenizer.py
checks ids on varied text.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from kimi.data.tokenizer import get_tokenizer
from kimi.data.tokenizer_files import split_spec


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of each byte (how byte-level BPE vocabularies write tokens)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = chr(256 + extra), extra + 1
    return table


def _vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    spell = _byte_to_unicode()

    def s(token: bytes) -> str:
        return "".join(spell[b] for b in token)

    merges = []
    for token, rank in ranks.items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token))]
        pairs = [(ranks[a], ranks[b], a, b) for a, b in splits if a in ranks and b in ranks]
        merges += [(rank, ra, rb, a, b) for ra, rb, a, b in pairs]
    merges.sort()
    return {s(t): r for t, r in ranks.items()}, [(s(a), s(b)) for *_, a, b in merges]


def tiktoken_to_hf_json(enc) -> str:
    """The `tokenizer.json` text of a tiktoken encoding (or kimi's FileEncoding, which passes `_mergeable_ranks`,
    `_pat_str` and `_special_tokens` through to the one it wraps)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab, merges = _vocab_and_merges(enc._mergeable_ranks)
    specials = dict(enc._special_tokens)
    tok = Tokenizer(models.BPE({**vocab, **specials}, merges, fuse_unk=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(enc._pat_str), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in sorted(specials, key=specials.get)])
    return tok.to_str()


def write_hf_tokenizer(name: str, out_dir: Path, model_max_length: int) -> dict[str, int]:
    """Write tokenizer.json and tokenizer_config.json for tokenizer `name` into `out_dir`; returns the
    ids HF's configs name ({"eos_token_id": ...})."""
    enc = get_tokenizer(name)
    eot = enc.decode([enc.eot_token])
    spec = split_spec(name)
    extra = {}
    if spec and spec[0] == "hf":
        shutil.copyfile(spec[1], out_dir / "tokenizer.json")
        sidecar = spec[1].with_name("tokenizer_config.json")
        if sidecar.is_file():
            extra = json.loads(sidecar.read_text(encoding="utf-8"))
    else:
        (out_dir / "tokenizer.json").write_text(tiktoken_to_hf_json(enc), encoding="utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eot,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        **extra,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return {"eos_token_id": enc.eot_token}
