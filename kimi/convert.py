"""Convert between nanoKimi checkpoints and Hugging Face DeepSeek-V3 (Kimi K2's architecture) checkpoints.

    python -m kimi.convert --from-hf HF_DIR OUT.pt     config.json + *.safetensors -> {"config", "model"}
    python -m kimi.convert --to-hf CKPT OUT_DIR        .pt or checkpoint dir -> config.json + model.safetensors

Parameter names already follow HF's; the mapping renames blocks (input_layernorm -> attn_norm, mlp -> ffn,
gate -> router, e_score_correction_bias -> expert_bias) and stacks / unstacks experts (HF stores
`experts.{e}.gate_proj.weight` on disk and a fused `gate_up_proj` in memory; both are read). Only HF
configs whose forward nanoKimi reproduces exactly are accepted (plain RoPE or YaRN, as Kimi K2 and
DeepSeek-V3 publish it); anything else (other RoPE scaling, non-SiLU activations, attention biases,
FP8-quantised weights, ...) is refused with one line, rather than converted into a model that silently
computes something else.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import torch

from kimi.config import AttentionConfig, Config, KimiConfig, MoEConfig, RopeScalingConfig

HF_MODEL_TYPES = ("deepseek_v3", "kimi_k2")


class ConvertError(ValueError):
    """A checkpoint or config that cannot be converted faithfully; the message says why."""


# ----------------------------------------------------------------------------- configs


def kimi_config_from_hf(hf: dict) -> KimiConfig:
    def refuse(why: str):
        raise ConvertError(f"cannot convert this HF config: {why}")

    if hf.get("model_type") not in HF_MODEL_TYPES:
        refuse(f"model_type={hf.get('model_type')!r}; only {HF_MODEL_TYPES} are supported")
    rope = hf.get("rope_parameters") or {}
    rope_scaling = _rope_scaling_from_hf(hf.get("rope_scaling") or rope, hf, refuse)
    if hf.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act={hf['hidden_act']!r}; experts and MLPs here are SwiGLU (silu)")
    if hf.get("attention_bias"):
        refuse("attention_bias=true; MLA here has no projection biases")
    if hf.get("quantization_config"):
        refuse("the weights are quantised (e.g. FP8 with weight_scale_inv); dequantise to bf16 first")
    n_head = hf["num_attention_heads"]
    if hf.get("num_key_value_heads") not in (None, n_head):
        refuse(f"num_key_value_heads={hf['num_key_value_heads']} != num_attention_heads={n_head}")
    if hf.get("scoring_func", "sigmoid") != "sigmoid":
        refuse(f"scoring_func={hf['scoring_func']!r}; DeepSeek-V3 routing is sigmoid")
    if hf.get("moe_layer_freq", 1) != 1:
        refuse(f"moe_layer_freq={hf['moe_layer_freq']}; only every layer after first_k_dense_replace is MoE")
    n_layer = hf["num_hidden_layers"]
    n_experts = hf.get("n_routed_experts") or 0
    attention = AttentionConfig(
        type="mla",
        q_lora_rank=hf.get("q_lora_rank"),
        kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"],
        qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"],
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rope_interleave=bool(hf.get("rope_interleave", True)),
        rope_scaling=rope_scaling,
    )
    first_dense = hf.get("first_k_dense_replace") or 0
    moe = MoEConfig(
        use_moe=n_experts > 0 and first_dense < n_layer,
        num_experts=max(1, n_experts),
        top_k=hf.get("num_experts_per_tok") or 1,
        expert_hidden=hf.get("moe_intermediate_size") or hf["intermediate_size"],
        n_shared_experts=hf.get("n_shared_experts") or 0,
        score_func="sigmoid",
        norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        n_group=hf.get("n_group") or 1,
        topk_group=hf.get("topk_group") or 1,
        first_k_dense_replace=min(first_dense, n_layer),
    )
    return KimiConfig(
        n_layer=n_layer,
        n_head=n_head,
        n_embd=hf["hidden_size"],
        vocab_size=hf["vocab_size"],
        block_size=hf.get("max_position_embeddings", 4096),
        intermediate_size=hf["intermediate_size"],
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
        attention=attention,
        moe=moe,
    )


_YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")


def _rope_scaling_from_hf(scaling: dict, hf: dict, refuse) -> RopeScalingConfig:
    """HF's `rope_scaling` (transformers 4, the published configs) or `rope_parameters` (transformers 5)."""
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return RopeScalingConfig()
    if kind != "yarn":
        refuse(f"RoPE scaling {kind!r} is not implemented; plain RoPE and YaRN convert exactly")
    if scaling.get("attention_factor") is not None or scaling.get("truncate", True) is not True:
        refuse(
            "YaRN with an explicit attention_factor or truncate=false is not implemented (DeepSeek-V3's has neither)"
        )
    # HF's defaults for what a config leaves out: beta 32 / 1 (also for 0 or null), original context =
    # max_position_embeddings, factor = the ratio of the two, mscale 1 and no softmax correction
    got = {k: scaling[k] for k in _YARN_KEYS if scaling.get(k) is not None}
    got["beta_fast"], got["beta_slow"] = scaling.get("beta_fast") or 32.0, scaling.get("beta_slow") or 1.0
    got.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings", 4096))
    if "factor" not in got:
        got["factor"] = hf.get("max_position_embeddings", 4096) / got["original_max_position_embeddings"]
    return RopeScalingConfig(type="yarn", **got)


def _rope_scaling_to_hf(s: RopeScalingConfig, theta: float) -> dict:
    if s.type == "none":
        return {"rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    params = {"rope_type": "yarn", "rope_theta": theta, **{k: getattr(s, k) for k in _YARN_KEYS}}
    # transformers 5 reads rope_parameters; 4.x (and the published K2 / V3 configs) rope_scaling
    return {"rope_parameters": params, "rope_scaling": {**params, "type": "yarn"}}


def hf_config_from_kimi(cfg: KimiConfig, dtype: str = "float32") -> dict:
    a, moe = cfg.attention, cfg.moe

    def refuse(why: str):
        raise ConvertError(f"cannot express this model as HF DeepSeek-V3: {why}")

    if a.type != "mla":
        refuse("attention.type='mha' (the dense baseline); DeepSeek-V3 is MLA only")
    if moe.use_moe and moe.score_func != "sigmoid":
        refuse(f"moe.score_func={moe.score_func!r}; HF routes with sigmoid")
    if moe.use_moe and moe.capacity_factor is not None:
        refuse("moe.capacity_factor drops tokens; HF DeepSeek-V3 is dropless (set it to null)")
    if moe.use_moe and moe.n_shared_experts < 1:
        refuse("moe.n_shared_experts=0; the DeepSeek-V3 layout always has shared experts")
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": moe.expert_hidden,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_head,
        "n_shared_experts": moe.n_shared_experts,
        "n_routed_experts": moe.num_experts,
        "routed_scaling_factor": moe.routed_scaling_factor,
        "kv_lora_rank": a.kv_lora_rank,
        "q_lora_rank": a.q_lora_rank,
        "qk_rope_head_dim": a.qk_rope_head_dim,
        "qk_nope_head_dim": a.qk_nope_head_dim,
        "v_head_dim": a.v_head_dim,
        "n_group": moe.n_group,
        "topk_group": moe.topk_group,
        "num_experts_per_tok": moe.top_k,
        # a dense-only model (moe.use_moe=false) is DeepSeek-V3 with every layer below the MoE cut
        "first_k_dense_replace": moe.first_k_dense_replace if moe.use_moe else cfg.n_layer,
        "norm_topk_prob": moe.norm_topk_prob,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_theta": a.rope_theta,
        **_rope_scaling_to_hf(a.rope_scaling, a.rope_theta),
        "rope_interleave": a.rope_interleave,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "num_nextn_predict_layers": 0,
        "use_cache": True,
        "dtype": dtype,
    }


# ----------------------------------------------------------------------------- weights

_RENAMES = [  # (HF pattern, nanoKimi replacement), applied to keys under model.layers.{i}.
    (r"self_attn\.", "attn."),
    (r"input_layernorm\.", "attn_norm."),
    (r"post_attention_layernorm\.", "ffn_norm."),
    (r"mlp\.gate\.weight$", "ffn.router.weight"),
    (r"mlp\.gate\.e_score_correction_bias$", "ffn.router.expert_bias"),
    (r"mlp\.", "ffn."),
]
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


def read_safetensors_dir(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ConvertError(
            f"no *.safetensors files in '{hf_dir}' (pytorch_model.bin checkpoints: re-save with safetensors)"
        )
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def kimi_state_from_hf(hf_sd: dict[str, torch.Tensor], cfg: KimiConfig) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for key, t in hf_sd.items():
        if key.endswith("weight_scale_inv"):
            raise ConvertError(f"'{key}': FP8-quantised weights; dequantise to bf16 first")
        if key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            out[key.removeprefix("model.")] = t
            continue
        m = _LAYER.match(key)
        if m is None:
            if key.endswith("rotary_emb.inv_freq"):
                continue
            raise ConvertError(f"unexpected tensor '{key}' in the HF checkpoint")
        layer = int(m.group(1))
        if layer >= cfg.n_layer:
            continue  # multi-token-prediction layers (num_nextn_predict_layers) are not part of the model
        if em := _EXPERT.match(key):
            experts.setdefault((layer, em.group(3)), {})[int(em.group(2))] = t
        elif fm := _FUSED.match(key):
            pre = f"layers.{layer}.ffn.experts."
            if fm.group(2) == "down_proj":
                out[pre + "w2"] = t
            else:  # gate_up_proj (E, 2F, D): gate rows first, then up (HF chunks it in two)
                out[pre + "w1"], out[pre + "w3"] = (c.contiguous() for c in t.chunk(2, dim=1))
        else:
            rest = m.group(2)
            for pat, rep in _RENAMES:  # in order: the router rules fire before the generic mlp. -> ffn.
                rest = re.sub(pat, rep, rest)
            out[f"layers.{layer}.{rest}"] = t
    ours = {"gate": "w1", "up": "w3", "down": "w2"}
    for (layer, which), per_expert in experts.items():
        if sorted(per_expert) != list(range(cfg.moe.num_experts)):
            raise ConvertError(f"layer {layer}: expected experts 0..{cfg.moe.num_experts - 1} for {which}_proj")
        out[f"layers.{layer}.ffn.experts.{ours[which]}"] = torch.stack([per_expert[e] for e in sorted(per_expert)])
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
        out["lm_head.weight"] = out["embed_tokens.weight"]
    return out


def hf_state_from_kimi(sd: dict[str, torch.Tensor], cfg: KimiConfig) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    reverse = [
        ("attn.", "self_attn."),
        ("attn_norm.", "input_layernorm."),
        ("ffn_norm.", "post_attention_layernorm."),
        ("ffn.router.weight", "mlp.gate.weight"),
        ("ffn.router.expert_bias", "mlp.gate.e_score_correction_bias"),
        ("ffn.", "mlp."),
    ]
    names = {"w1": "gate", "w3": "up", "w2": "down"}
    for key, t in sd.items():
        if key in ("embed_tokens.weight", "norm.weight"):
            out["model." + key] = t
        elif key == "lm_head.weight":
            if not cfg.tie_embeddings:
                out[key] = t
        else:
            layer, rest = key.split(".", 2)[1:]
            if m := re.match(r"ffn\.experts\.(w[123])$", rest):
                for e in range(t.shape[0]):
                    out[f"model.layers.{layer}.mlp.experts.{e}.{names[m.group(1)]}_proj.weight"] = t[e]
                continue
            for ours, theirs in reverse:
                if rest.startswith(ours):
                    rest = theirs + rest[len(ours) :]
                    break
            out[f"model.layers.{layer}.{rest}"] = t
    return {k: v.detach().contiguous().clone() for k, v in out.items()}  # safetensors: no shared storage


# ----------------------------------------------------------------------------- whole checkpoints


def from_hf(hf_dir) -> tuple[KimiConfig, dict[str, torch.Tensor]]:
    """Read an HF DeepSeek-V3 directory; return a checked (config, state_dict) for KimiModel."""
    from kimi.model import KimiModel
    from kimi.model.loading import check_state_dict

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise ConvertError(f"'{hf_dir}' has no config.json; expected a Hugging Face model directory")
    cfg = kimi_config_from_hf(json.loads((hf_dir / "config.json").read_text()))
    sd = kimi_state_from_hf(read_safetensors_dir(hf_dir), cfg)
    with torch.device("meta"):
        model = KimiModel(cfg)
    return cfg, check_state_dict(model, sd)


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


def to_hf(
    cfg: KimiConfig,
    sd: dict[str, torch.Tensor],
    out_dir,
    tokenizer: str | None = None,
    max_shard_bytes: int = 5 * 10**9,
) -> Path:
    """Write config.json + model.safetensors that transformers' DeepseekV3ForCausalLM loads; with `tokenizer`
    (a name as in data.tokenizer_name) also tokenizer.json + tokenizer_config.json (AutoTokenizer) and a
    generation_config.json that stops at its end-of-document token and never picks the rows of a vocabulary
    padded past the tokenizer's (as kimi.generate does)."""
    from kimi.model import KimiModel
    from kimi.model.loading import check_state_dict

    with torch.device("meta"):
        model = KimiModel(cfg)
    sd = check_state_dict(model, sd)
    hf_cfg = hf_config_from_kimi(cfg, str(sd["embed_tokens.weight"].dtype).removeprefix("torch."))
    tensors = hf_state_from_kimi(sd, cfg)
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
    args = p.parse_args(argv)
    if args.tokenizer and args.from_hf:
        p.error("--tokenizer goes with --to-hf (an HF directory's own tokenizer stays beside it)")
    try:
        if args.from_hf:
            cfg, sd = from_hf(args.from_hf)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            tokenizer = _import_tokenizer(Path(args.from_hf), Path(args.out), cfg)
            torch.save({"config": Config(model=cfg).to_dict(), "model": sd}, args.out)
            print(f"tokenizer: {tokenizer}" if tokenizer else "the HF folder has no tokenizer (none written)")
        else:
            from kimi.loading import read_weights, tokenizer_name_of

            if Path(args.out).exists() and not Path(args.out).is_dir():
                raise ConvertError(f"OUT_DIR '{args.out}' is an existing file; give a directory (new or existing)")
            cfg, sd = read_weights(args.to_hf)
            tokenizer = args.tokenizer or tokenizer_name_of(args.to_hf)
            to_hf(cfg, sd, args.out, tokenizer, parse_size(args.max_shard_size))
            if tokenizer is None:
                print("no tokenizer written (a .pt file records none); add --tokenizer NAME for AutoTokenizer")
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
