"""Tokenizers loaded from the user's own files: `tiktoken:PATH` and `hf:PATH`.

    tiktoken:PATH   a tiktoken BPE file ("<base64 token bytes> <rank>" per line; Kimi K2 ships its vocabulary
                    in this format as `tiktoken.model`), read with `tiktoken.load.load_tiktoken_bpe`. Its
                    pre-tokenizer pattern and special tokens come from an optional JSON beside it, PATH + ".json":
                        {"pat_str": "<regex>",                      default: GPT-2's pattern
                         "special_tokens": {"<|endoftext|>": 100257, "[EOS]": 163585, ...},
                         "eot": "[EOS]"}                            the token that ends documents
                    Without the JSON (or without "special_tokens") there is one special token, <|endoftext|>,
                    with the first id after the ranks, as in GPT-2 and `byte`.
    hf:PATH         a Hugging Face `tokenizer.json`, through the `tokenizers` library.

The end-of-document token (eot: written before every document in the shards, and where `generate` stops):
for tiktoken files, the JSON's "eot"; else <|endoftext|>, [EOS] or </s>, the first one that is a special
token. For hf files, `eos_token` of a `tokenizer_config.json` beside the file; else the first of
<|endoftext|>, </s>, [EOS], <eos>, <|end_of_text|> that the tokenizer knows. With none of these we refuse,
naming the file and the setting that fixes it, rather than guess an id.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import tiktoken

from kimi.files import sha256_file

ENDOFTEXT = "<|endoftext|>"
FILE_KINDS = ("tiktoken", "hf")
CHECKPOINT_DIR = "tokenizer"  # a checkpoint's copy of its tokenizer files, beside config.yaml
TIKTOKEN_EOT_NAMES = ("<|endoftext|>", "[EOS]", "</s>")
HF_EOT_NAMES = ("<|endoftext|>", "</s>", "[EOS]", "<eos>", "<|end_of_text|>")


# The pre-tokenizer pattern of Kimi K2's and Moonlight's tiktoken.model (their tokenization_kimi.py /
# tokenization_moonshot.py hold it in code, not in a file): Han runs, case-aware words with English
# contractions, 1-3 digits, punctuation runs, newlines, spaces.
KIMI_PATTERN = "|".join(
    [
        r"[\p{Han}]+",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)
KIMI_TOKENIZER_CODE = ("tokenization_kimi", "tokenization_moonshot")  # auto_map names that mean KIMI_PATTERN


class TokenizerFileError(ValueError):
    """A tokenizer file is missing or does not parse; the message names the file and the fix."""


def split_spec(name: str) -> tuple[str, Path] | None:
    """("tiktoken" | "hf", path) for a file tokenizer's name, None for a built-in one."""
    kind, colon, path = name.partition(":")
    if colon and kind in FILE_KINDS and path:
        return kind, Path(path).expanduser()
    return None


def _tiktoken_sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _hf_sidecar(path: Path) -> Path:
    return path.with_name("tokenizer_config.json")


def tokenizer_files(name: str) -> dict[str, str]:
    """{file name: sha256} of the files a tokenizer is built from ({} for the built-in ones). The optional
    sidecar JSON counts only when it exists. Names are bare file names: the data can move, the hashes say
    whether it is the same tokenizer."""
    spec = split_spec(name)
    if spec is None:
        return {}
    kind, path = spec
    if not path.is_file():
        raise TokenizerFileError(f"tokenizer file '{path}' does not exist; check the path in --tokenizer {name}")
    sidecar = _tiktoken_sidecar(path) if kind == "tiktoken" else _hf_sidecar(path)
    return {p.name: sha256_file(p) for p in (path, sidecar) if p.is_file()}


def copy_tokenizer_files(name: str, dest: Path, files: dict[str, str]) -> None:
    """Copy the files `tokenizer_files(name)` listed into `dest` (a checkpoint's tokenizer/), same names."""
    dest.mkdir(parents=True, exist_ok=True)
    for file_name in files:
        shutil.copy2(split_spec(name)[1].with_name(file_name), dest / file_name)


def name_in(name: str, folder: Path) -> str:
    """`name` pointed at the copies in `folder` (see copy_tokenizer_files), or `name` itself where there are
    none (a built-in tokenizer, or a checkpoint from before tokenizer files were copied)."""
    spec = split_spec(name)
    if spec and (Path(folder) / spec[1].name).is_file():
        return f"{spec[0]}:{Path(folder) / spec[1].name}"
    return name


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerFileError(f"'{path}' is not valid JSON ({e}); fix it or remove it ({what})") from None
    if not isinstance(data, dict):
        raise TokenizerFileError(f"'{path}' must hold a JSON object ({what})")
    return data


def read_bpe_ranks(path: Path) -> dict[bytes, int]:
    """Token bytes -> rank, parsed as `tiktoken.load.load_tiktoken_bpe` does. Not that function itself: it
    caches every file it reads under a key made from the path alone (in $TIKTOKEN_CACHE_DIR or
    /tmp/data-gym-cache), so an edited file at the same path would keep giving the old vocabulary."""
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
    return ranks


def build_tiktoken_file(path: Path, name: str, default_pat_str: str) -> FileEncoding:
    """A `tiktoken.Encoding` from a BPE ranks file and its optional PATH.json (see the module docstring)."""
    if not path.is_file():
        raise TokenizerFileError(f"tokenizer file '{path}' does not exist; check the path in --tokenizer {name}")
    try:
        ranks = read_bpe_ranks(path)
    except (ValueError, UnicodeDecodeError) as e:  # binascii.Error is a ValueError
        raise TokenizerFileError(
            f"'{path}' is not a tiktoken BPE file ({type(e).__name__}: {e}); each line must be "
            "'<base64 token bytes> <rank>'"
        ) from None
    if not ranks:
        raise TokenizerFileError(f"'{path}' holds no tokens; each line must be '<base64 token bytes> <rank>'")
    side = _tiktoken_sidecar(path)
    opts = _read_json(side, 'keys "pat_str", "special_tokens", "eot"') if side.is_file() else {}
    special = opts.get("special_tokens", {ENDOFTEXT: max(ranks.values()) + 1})
    if not isinstance(special, dict) or not all(isinstance(v, int) for v in special.values()):
        raise TokenizerFileError(f"'{side}': \"special_tokens\" must map token text to an integer id")
    eot = opts.get("eot") or next((t for t in TIKTOKEN_EOT_NAMES if t in special), None)
    if eot not in special:
        raise TokenizerFileError(
            f"'{path}': no end-of-document token; set \"eot\" in '{side}' to one of its \"special_tokens\""
        )
    try:
        enc = tiktoken.Encoding(
            name=name, pat_str=opts.get("pat_str", default_pat_str), mergeable_ranks=ranks, special_tokens=special
        )
    except Exception as e:  # a bad regex, overlapping ids
        raise TokenizerFileError(f"'{path}' with '{side}' does not make a tokenizer ({e}); fix the JSON") from None
    return FileEncoding(enc, special[eot])


class FileEncoding:
    """A tiktoken.Encoding whose eot is any of its special tokens (tiktoken's own `eot_token` is always
    <|endoftext|>, which Kimi K2's vocabulary does not have). Everything else is the Encoding's."""

    def __init__(self, enc: tiktoken.Encoding, eot_token: int):
        self._enc, self.eot_token = enc, eot_token

    def __getattr__(self, attr):
        if attr == "_enc":  # not set yet (during unpickling): no recursion
            raise AttributeError(attr)
        return getattr(self._enc, attr)


class HFEncoding:
    """A Hugging Face `tokenizers.Tokenizer` behind the part of `tiktoken.Encoding` nanoKimi uses:
    encode_ordinary, encode, decode, n_vocab, eot_token, name."""

    def __init__(self, tok, eot_token: int, name: str):
        self._tok, self.eot_token, self.name = tok, eot_token, name
        self._plain = tok.__class__.from_str(tok.to_str())
        self._plain.encode_special_tokens = True  # special-token text inside the data stays text
        self.n_vocab = max(tok.get_vocab_size(with_added_tokens=True), max(tok.get_vocab().values()) + 1)
        self._pat_str = None

    def encode_ordinary(self, text: str) -> list[int]:
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode(self, text: str, allowed_special=frozenset()) -> list[int]:
        """Special tokens written in `text` become their ids (all of them, whatever `allowed_special` says)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def build_hf_file(path: Path, name: str) -> HFEncoding:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise TokenizerFileError("hf: tokenizers need the `tokenizers` package; pip install tokenizers") from None
    if not path.is_file():
        raise TokenizerFileError(f"tokenizer file '{path}' does not exist; check the path in --tokenizer {name}")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TokenizerFileError(
            f"'{path}' is not a Hugging Face tokenizer.json ({first}); save one with Tokenizer.save()"
        ) from None
    vocab = tok.get_vocab(with_added_tokens=True)
    side = _hf_sidecar(path)
    eos = _read_json(side, "its eos_token names the eot").get("eos_token") if side.is_file() else None
    eos = eos.get("content") if isinstance(eos, dict) else eos
    eot = eos or next((t for t in HF_EOT_NAMES if t in vocab), None)
    if eot not in vocab:
        raise TokenizerFileError(
            f"'{path}': no end-of-document token (none of {', '.join(HF_EOT_NAMES)}); add one to the tokenizer "
            f"or name it as \"eos_token\" in '{side}'"
        )
    return HFEncoding(tok, vocab[eot], name)


def build_file_tokenizer(name: str, default_pat_str: str) -> FileEncoding | HFEncoding:
    """The tokenizer `tiktoken:PATH` or `hf:PATH` names; `default_pat_str` where a tiktoken file has none."""
    kind, path = split_spec(name)
    return build_tiktoken_file(path, name, default_pat_str) if kind == "tiktoken" else build_hf_file(path, name)


# ----------------------------------------------------------------------------- the tokenizer of an HF checkpoint


def beside_pt(pt: Path) -> Path:
    """Where `kimi.convert --from-hf` puts the tokenizer of OUT.pt: the folder OUT.pt.tokenizer."""
    return pt.with_name(pt.name + ".tokenizer")


def tokenizer_of_pt(pt: Path) -> str | None:
    """The tokenizer name recorded beside a `.pt` (see import_hf_tokenizer), or None."""
    folder = beside_pt(Path(pt))
    for kind, file in (("hf", "tokenizer.json"), ("tiktoken", "tiktoken.model")):
        if (folder / file).is_file():
            return f"{kind}:{folder / file}"
    return None


def import_hf_tokenizer(hf_dir: Path, dest: Path) -> str | None:
    """Copy an HF checkpoint's tokenizer into `dest` in a form `--tokenizer` reads; returns its name, None when
    the folder has none. A tokenizer.json (with its tokenizer_config.json) goes as is. A tiktoken.model (Kimi
    K2, Moonlight) gets the sidecar JSON this module reads: special tokens and eos from tokenizer_config.json
    (added_tokens_decoder, eos_token), the pattern from its tokenizer code, which must be a known one."""
    side = hf_dir / "tokenizer_config.json"
    opts = _read_json(side, "the checkpoint's tokenizer settings") if side.is_file() else {}
    if (hf_dir / "tokenizer.json").is_file():
        dest.mkdir(parents=True, exist_ok=True)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            if (hf_dir / f).is_file():
                shutil.copyfile(hf_dir / f, dest / f)
        return f"hf:{dest / 'tokenizer.json'}"
    if not (hf_dir / "tiktoken.model").is_file():
        return None
    code = json.dumps(opts.get("auto_map", {}))
    if not any(k in code for k in KIMI_TOKENIZER_CODE):
        raise TokenizerFileError(
            f"'{hf_dir / 'tiktoken.model'}': its pre-tokenizer pattern lives in tokenizer code this converter "
            f'does not know ({code}); write tiktoken.model.json with its "pat_str" and use --tokenizer tiktoken:PATH'
        )
    specials = {v["content"]: int(k) for k, v in opts.get("added_tokens_decoder", {}).items()}
    eos = opts.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if eos not in specials:
        raise TokenizerFileError(f"'{side}': eos_token {eos!r} is not one of its added_tokens_decoder tokens")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(hf_dir / "tiktoken.model", dest / "tiktoken.model")
    sidecar = {"pat_str": KIMI_PATTERN, "special_tokens": specials, "eot": eos}
    _tiktoken_sidecar(dest / "tiktoken.model").write_text(json.dumps(sidecar, indent=1) + "\n", encoding="utf-8")
    return f"tiktoken:{dest / 'tiktoken.model'}"
