"""Convert between nanoKimi checkpoints and Hugging Face DeepSeek-V3 (Kimi K2's architecture) checkpoints.

    python -m kimi.convert --from-hf HF_DIR OUT.pt     config.json + *.safetensors -> {"config", "model"}
    python -m kimi.convert --to-hf CKPT OUT_DIR        .pt or checkpoint dir -> config.json + model.safetensors

Parameter names already follow HF's; the mapping renames blocks (input_layernorm -> attn_norm, mlp -> ffn,
gate -> router, e_score_correction_bias -> expert_bias) and stacks / unstacks experts (HF stores
`experts.{e}.gate_proj.weight` on disk and a fused `gate_up_proj` in memory; both are read). Only HF
configs whose forward nanoKimi reproduces exactly are accepted (plain RoPE or YaRN, as Kimi K2 and
DeepSeek-V3 publish it); anything else (other RoPE scaling, non-SiLU activations, attention biases,
non-FP8 quantisation, ...) is refused with one line, rather than converted into a model that silently
computes something else.

Reading streams: the shards an index (`model.safetensors.index.json`) names, or every `*.safetensors`,
are read one tensor at a time and each is placed into the output as it comes, so peak memory is the
output plus about one tensor, never the model twice. DeepSeek-V3 / Kimi-K2 FP8 checkpoints
(`quantization_config: {quant_method: fp8, fmt: e4m3, weight_block_size: [128, 128]}`, a float32
`<name>.weight_scale_inv` of ceil(rows/128) x ceil(cols/128) per weight) are dequantised on the way in.
Multi-token-prediction layers (`num_nextn_predict_layers`, stored at layer index n_layer and beyond) are
dropped with one printed line.

Writing: `--to-hf` writes HF's sharded layout past --max-shard-size, and the tokenizer with a
generation_config.json (kimi/data/hf_tokenizer.py). `--dtype` casts the weights (default: as stored);
`--dtype fp8` writes DeepSeek's block FP8 as the published K2/V3 checkpoints are: every linear weight of
the blocks but the router in e4m3 with a 128 x 128-tile `weight_scale_inv`, the rest in bf16, and the
`quantization_config` that the import (and DeepSeek-V3 inference code) reads back.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from kimi.checkpoint.fp8 import SCALE, quantize_fp8
from kimi.checkpoint.hf import (  # noqa: F401  (re-exported: the converter's API as before)
    ConvertError,
    from_hf,
    hf_config_from_kimi,
    hf_state_from_kimi,
    kimi_config_from_hf,
    kimi_state_from_hf,
)
from kimi.config import Config, KimiConfig


def write_shards(tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int) -> list[str]:
    """HF's layout: one model.safetensors, or model-0000i-of-0000n.safetensors of at most `max_shard_bytes`
    each (a larger tensor gets one to itself) with model.safetensors.index.json mapping names to files."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": {k: f for f, sh in zip(names, shards) for k in sh}}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    for f, shard in zip(names, shards):
        save_file(shard, str(out_dir / f), metadata={"format": "pt"})
    return names


def parse_size(text: str) -> int:
    """'5GB', '500MB', '100KB' or a plain number of bytes -> bytes (decimal units, as HF's max_shard_size)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    t = text.strip().upper()
    unit = next((u for u in units if t.endswith(u)), "B")
    try:
        n = float(t.removesuffix(unit))
    except ValueError:
        raise ConvertError(f"--max-shard-size {text!r} is not a size; write e.g. 5GB or 500MB") from None
    if n <= 0:
        raise ConvertError(f"--max-shard-size {text!r} must be positive")
    return int(n * units[unit])


EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "fp8": None}
FP8_BLOCK = (128, 128)
FP8_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": list(FP8_BLOCK),
}


def _quantized(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The published K2/V3 layout: the blocks' linear weights (attention, dense, shared and routed expert
    projections) in block FP8 with their scales, everything else (embedding, head, norms, the router and
    its bias) in bf16."""
    out = {}
    for name, t in tensors.items():
        if t.dim() == 2 and name.startswith("model.layers.") and not name.endswith("mlp.gate.weight"):
            out[name], out[name + SCALE] = quantize_fp8(t, FP8_BLOCK)
        else:
            out[name] = t.to(torch.bfloat16)
    return out


def to_hf(
    cfg: KimiConfig,
    sd: dict[str, torch.Tensor],
    out_dir,
    tokenizer: str | None = None,
    max_shard_bytes: int = 5 * 10**9,
    dtype: str | None = None,
) -> Path:
    """Write config.json + model.safetensors that transformers' DeepseekV3ForCausalLM loads; with `tokenizer`
    (a name as in data.tokenizer_name) also tokenizer.json + tokenizer_config.json (AutoTokenizer) and a
    generation_config.json that stops at its end-of-document token and never picks the rows of a vocabulary
    padded past the tokenizer's (as kimi.generate does). `dtype`: one of EXPORT_DTYPES (None: as stored)."""
    from kimi.model import KimiModel
    from kimi.model.loading import check_state_dict

    with torch.device("meta"):
        model = KimiModel(cfg)
    sd = check_state_dict(model, sd)
    tensors = hf_state_from_kimi(sd, cfg)
    if dtype == "fp8":
        tensors = _quantized(tensors)
    elif dtype is not None:
        tensors = {k: t.to(EXPORT_DTYPES[dtype]) for k, t in tensors.items()}
    hf_cfg = hf_config_from_kimi(cfg, str(tensors["model.embed_tokens.weight"].dtype).removeprefix("torch."))
    if dtype == "fp8":
        hf_cfg["quantization_config"] = FP8_CONFIG
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        hf_cfg.update(_write_tokenizer(tokenizer, cfg, out_dir))
    for old in [*out_dir.glob("model*.safetensors"), out_dir / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)  # a re-export with other shards leaves none of the previous ones
    write_shards(tensors, out_dir, max_shard_bytes)
    (out_dir / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    return out_dir


def _import_tokenizer(hf_dir: Path, out_pt: Path, cfg: KimiConfig) -> str | None:
    """The HF folder's tokenizer, copied beside OUT.pt (OUT.pt.tokenizer/), where generate and evaluate find it."""
    from kimi.data.tokenizer import get_tokenizer
    from kimi.data.tokenizer_files import beside_pt, import_hf_tokenizer

    dest = beside_pt(out_pt)
    shutil.rmtree(dest, ignore_errors=True)  # a stale one from an earlier conversion to the same name
    name = import_hf_tokenizer(hf_dir, dest)
    if name is not None and (n := get_tokenizer(name).n_vocab) > cfg.vocab_size:
        shutil.rmtree(dest)
        raise ConvertError(
            f"the tokenizer in '{hf_dir}' has {n} tokens but config.json's vocab_size is {cfg.vocab_size}; "
            "the checkpoint and its tokenizer do not belong together"
        )
    return name


def _recorded_tokenizer(ckpt: str, cfg: KimiConfig) -> str | None:
    """The tokenizer the checkpoint records, when it fits the model; else None, said in one line (a run on
    random tokens records the default gpt2 with a vocabulary far smaller than its 50,257 ids)."""
    from kimi.data.tokenizer import get_tokenizer
    from kimi.loading import tokenizer_name_of

    name = tokenizer_name_of(ckpt)
    if name is None:
        print("no tokenizer written (a .pt file records none); add --tokenizer NAME for AutoTokenizer")
    elif (n := get_tokenizer(name).n_vocab) > cfg.vocab_size:
        print(f"no tokenizer written: the checkpoint records {name!r} ({n} tokens), more than the model's "
              f"{cfg.vocab_size} rows (trained on other tokens?); add --tokenizer NAME if one fits")  # fmt: skip
        return None
    return name


def _write_tokenizer(name: str, cfg: KimiConfig, out_dir: Path) -> dict:
    from kimi.data.hf_tokenizer import write_hf_tokenizer
    from kimi.data.tokenizer import get_tokenizer

    n_vocab = get_tokenizer(name).n_vocab
    if n_vocab > cfg.vocab_size:
        raise ConvertError(
            f"tokenizer {name!r} has {n_vocab} tokens but the model only {cfg.vocab_size}; pass the --tokenizer "
            "the model was trained with"
        )
    ids = {"bos_token_id": None, **write_hf_tokenizer(name, out_dir, cfg.block_size)}
    ids["pad_token_id"] = ids["eos_token_id"]  # no padding token of its own; batches pad with eot
    gen = {**ids, "suppress_tokens": list(range(n_vocab, cfg.vocab_size)) or None}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return ids


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kimi.convert", description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--from-hf", metavar="HF_DIR", help="HF DeepSeek-V3 directory -> nanoKimi .pt")
    g.add_argument("--to-hf", metavar="CKPT", help="nanoKimi .pt or checkpoint directory -> HF directory")
    p.add_argument("out", help="OUT.pt (--from-hf) or OUT_DIR (--to-hf)")
    p.add_argument(
        "--max-shard-size",
        default="5GB",
        help="--to-hf: largest safetensors file; more weights go to model-0000i-of-0000n files with an index "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--tokenizer",
        help="--to-hf: the tokenizer to write beside the weights (gpt2, byte, tiktoken:PATH, hf:PATH; default: "
        "the one a checkpoint directory was trained with; a .pt records none, so none without this flag)",
    )
    p.add_argument(
        "--dtype",
        choices=list(EXPORT_DTYPES),
        help="--to-hf: weights as float32, bfloat16, or fp8 (DeepSeek's 128 x 128 block FP8, the rest bf16); "
        "default: as stored",
    )
    args = p.parse_args(argv)
    if args.tokenizer and args.from_hf:
        p.error("--tokenizer goes with --to-hf (an HF directory's own tokenizer stays beside it)")
    if args.dtype and args.from_hf:
        p.error("--dtype goes with --to-hf (--from-hf keeps the dtype config.json names)")
    try:
        if args.from_hf:
            cfg, sd = from_hf(args.from_hf)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            tokenizer = _import_tokenizer(Path(args.from_hf), Path(args.out), cfg)
            torch.save({"config": Config(model=cfg).to_dict(), "model": sd}, args.out)
            print(f"tokenizer: {tokenizer}" if tokenizer else "the HF folder has no tokenizer (none written)")
        else:
            from kimi.loading import read_weights

            if Path(args.out).exists() and not Path(args.out).is_dir():
                raise ConvertError(f"OUT_DIR '{args.out}' is an existing file; give a directory (new or existing)")
            cfg, sd = read_weights(args.to_hf)
            tokenizer = args.tokenizer or _recorded_tokenizer(args.to_hf, cfg)
            to_hf(cfg, sd, args.out, tokenizer, parse_size(args.max_shard_size), args.dtype)
    except ValueError as e:  # ConvertError, ConfigError and checkpoint errors are all one-liners
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a path under a file, no permission: the path and the reason
        print(f"error: '{e.filename or args.out}': {e.strerror or e}", file=sys.stderr)
        return 2
    n = sum(t.numel() for k, t in sd.items() if k != "lm_head.weight" or not cfg.tie_embeddings)
    print(f"wrote {args.out}: {cfg.n_layer} layers x {cfg.n_embd}, {n} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
