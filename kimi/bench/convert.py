"""Peak memory of `python -m kimi.convert --from-hf` on a sharded HF folder, against the shards' size.

    python -m kimi.bench convert [--quick] [--convert-config configs/small.yaml] [--shards 4] [--fp8]

Writes a randomly initialised model of `--convert-config` as an HF DeepSeek-V3 folder in bf16 (the dtype
published checkpoints use), split into `--shards` files with a model.safetensors.index.json, or with its
linear weights in DeepSeek's block FP8 (`--fp8`: float8_e4m3fn + 128x128 float32 scales); then runs the
converter as its own process and reports its exact peak RSS (VmHWM) next to: the shards on disk, the
largest tensor, the output state, and the same conversion of the 1 MB debug model (the floor: torch,
the converter and the model code imported).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from kimi.bench.data import measure
from kimi.bench.tables import save_json

MB = 2**20


def fp8_tiles(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 scale_inv per block x block tile), padded tiles at the edges."""
    rows, cols = w.shape
    pad = torch.zeros(-(-rows // block) * block, -(-cols // block) * block)
    pad[:rows, :cols] = w.float()
    tiles = pad.view(pad.shape[0] // block, block, pad.shape[1] // block, block)
    scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
    q = (tiles / scale[:, None, :, None]).view(pad.shape)[:rows, :cols].to(torch.float8_e4m3fn)
    return q, scale


def write_hf_folder(config: str, out: Path, shards: int, fp8: bool) -> dict:
    """A random model of `config` as an HF folder in `shards` files; its sizes in MB. The HF files come from
    `python -m kimi.convert --to-hf` (bench may not import its sibling entry point), then are split."""
    from safetensors.torch import load_file, save_file

    from kimi.config import Config, load_config
    from kimi.model import KimiModel

    cfg = load_config(config, []).model
    torch.manual_seed(0)
    out.mkdir(parents=True)
    torch.save({"config": Config(model=cfg).to_dict(), "model": KimiModel(cfg).to(torch.bfloat16).state_dict()},
               out / "kimi.pt")  # fmt: skip
    subprocess.run([sys.executable, "-m", "kimi.convert", "--to-hf", str(out / "kimi.pt"), str(out)], check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    tensors = load_file(str(out / "model.safetensors"))
    for f in ("kimi.pt", "model.safetensors"):
        (out / f).unlink()
    hf_cfg = json.loads((out / "config.json").read_text())
    if fp8:
        hf_cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
        for k in [k for k, t in tensors.items() if t.dim() == 2 and k.endswith("_proj.weight")]:
            tensors[k], tensors[k + "_scale_inv"] = fp8_tiles(tensors[k])
    largest = max(t.numel() * t.element_size() for t in tensors.values())
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    # contiguous runs of keys about total / shards bytes each, as save_pretrained's max_shard_size does
    names, where, filled, i = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)], {}, 0, 0
    for k in sorted(tensors):
        if filled >= total / shards * (i + 1) and i < shards - 1:
            i += 1
        where[k], filled = names[i], filled + tensors[k].numel() * tensors[k].element_size()
    for name in names:
        save_file({k: t for k, t in tensors.items() if where[k] == name}, str(out / name), metadata={"format": "pt"})
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": where})
    )
    (out / "config.json").write_text(json.dumps(hf_cfg))
    sizes = [(out / n).stat().st_size for n in names]
    return {"shards": shards, "fp8": fp8, "shards_mb": sum(sizes) / MB, "largest_shard_mb": max(sizes) / MB,
            "largest_tensor_mb": largest / MB}  # fmt: skip


def run(config: str, shards: int, fp8: bool, work: Path) -> dict:
    r = write_hf_folder(config, work / "hf", shards, fp8)
    write_hf_folder("configs/debug.yaml", work / "floor", 1, fp8)  # 1 MB: what the process costs anyway
    floor = measure("kimi.convert", "--from-hf", str(work / "floor"), str(work / "floor.pt"))
    conv = measure("kimi.convert", "--from-hf", str(work / "hf"), str(work / "out.pt"))
    sd = torch.load(work / "out.pt", map_location="meta", weights_only=True)["model"]
    r.update(config=config, output_mb=sum(t.numel() * t.element_size() for t in sd.values()) / MB,
             floor_mb=floor["self_mb"], peak_mb=conv["self_mb"], wall_s=conv["wall_s"])  # fmt: skip
    r["above_floor_mb"] = r["peak_mb"] - r["floor_mb"]
    return r


def report(r: dict) -> str:
    kind = "FP8 128x128" if r["fp8"] else "bf16"
    return (
        f"{r['config']} ({kind}) in {r['shards']} shards, {r['shards_mb']:.0f} MB on disk (largest shard "
        f"{r['largest_shard_mb']:.0f} MB, largest tensor {r['largest_tensor_mb']:.0f} MB) -> {r['output_mb']:.0f} MB "
        f"output: peak RSS {r['peak_mb']:.0f} MB, {r['above_floor_mb']:.0f} MB above the {r['floor_mb']:.0f} MB of "
        f"converting the 1 MB debug model the same way; {r['wall_s']:.1f} s"
    )


def main(args, overrides: list[str]) -> dict:
    if overrides:
        raise ValueError(f"kimi.bench convert takes no config overrides (got {' '.join(overrides)})")
    if args.shards < 1:
        raise ValueError(f"--shards={args.shards}: give at least 1")
    work = Path(tempfile.mkdtemp(prefix="kimi-bench-convert-"))
    config = "configs/debug.yaml" if args.quick else args.convert_config
    try:
        r = run(config, args.shards, args.fp8, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    save_json(args.json, r)
    print(report(r))
    return r


def add_args(p) -> None:
    p.add_argument("--convert-config", default="configs/small.yaml", help="convert: the model to write as HF shards")
    p.add_argument("--shards", type=int, default=4, help="convert: how many safetensors files (default: %(default)s)")
    p.add_argument("--fp8", action="store_true", help="convert: linear weights in DeepSeek's block FP8")
