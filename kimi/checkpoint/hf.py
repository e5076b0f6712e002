"""The Hugging Face DeepSeek-V3 / Kimi-K2 checkpoint format: its config.json as a KimiConfig and back, its
safetensors read one tensor at a time (index, shards, DeepSeek block FP8), its names as nanoKimi's and back.

Used by `python -m kimi.convert` (whole models on one process) and by the trainer's `train.init_from_hf`,
where each rank places only what its shards hold (`load_hf_into`). Pure format code: no engine, no
process group of its own.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from kimi.checkpoint.fp8 import FP8_DTYPES, SCALE, dequantize_fp8
from kimi.config import AttentionConfig, KimiConfig, MoEConfig, RopeScalingConfig

HF_MODEL_TYPES = ("deepseek_v3", "kimi_k2")
HF_ARCHITECTURE = "DeepseekV3ForCausalLM"


class ConvertError(ValueError):
    """A checkpoint or config that cannot be converted faithfully; the message says why."""


# ----------------------------------------------------------------------------- configs


def kimi_config_from_hf(hf: dict) -> KimiConfig:
    def refuse(why: str):
        raise ConvertError(f"cannot convert this HF config: {why}")

    archs = hf.get("architectures") or [HF_ARCHITECTURE]
    if HF_ARCHITECTURE not in archs:
        refuse(f"architectures={archs}; only {HF_ARCHITECTURE} (DeepSeek-V3, Kimi-K2) converts")
    if hf.get("model_type") not in HF_MODEL_TYPES:
        refuse(f"model_type={hf.get('model_type')!r}; only {HF_MODEL_TYPES} are supported")
    rope = hf.get("rope_parameters") or {}
    rope_scaling = _rope_scaling_from_hf(hf.get("rope_scaling") or rope, hf, refuse)
    if hf.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act={hf['hidden_act']!r}; experts and MLPs here are SwiGLU (silu)")
    if hf.get("attention_bias"):
        refuse("attention_bias=true; MLA here has no projection biases")
    fp8_block_size(hf)  # refuses quantisation other than DeepSeek's block FP8
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
        "architectures": [HF_ARCHITECTURE],
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


# ----------------------------------------------------------------------------- reading HF folders

INDEX = "model.safetensors.index.json"


def fp8_block_size(hf: dict) -> tuple[int, int] | None:
    """(rows, cols) of the scale blocks when config.json declares DeepSeek's block FP8; None when the
    checkpoint is not quantised. Any other quantisation is refused: its weights would be misread."""
    q = hf.get("quantization_config")
    if not q:
        return None

    def refuse(why: str):
        raise ConvertError(f"cannot convert this HF config: quantization_config {why}")

    if q.get("quant_method") != "fp8":
        refuse(
            f"quant_method={q.get('quant_method')!r}; only DeepSeek's block FP8 ('fp8') is dequantised here: "
            "dequantise the checkpoint to bf16 with the tool that quantised it"
        )
    if q.get("fmt", "e4m3") != "e4m3":
        refuse(f"fmt={q['fmt']!r}; only e4m3 FP8 (DeepSeek-V3, Kimi-K2) is read")
    block = q.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        refuse(
            f"weight_block_size={block!r}; expected [rows, cols] such as [128, 128] (per-tensor scales are not read)"
        )
    return block[0], block[1]


def _open(path: Path):
    from safetensors import safe_open

    try:
        # pread: each tensor is read into memory of its own. The default (mmap) hands out tensors that view
        # the mapped file, so every page read stays resident while any tensor of that shard lives: the
        # output would keep whole shards mapped, and the experts copied out of them counted twice.
        return safe_open(str(path), framework="pt", device="cpu", backend="pread")
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: safetensors' reason, on one line
        raise ConvertError(f"cannot read '{path}': {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _get(f, name: str, path: Path) -> torch.Tensor:
    try:
        return f.get_tensor(name)
    except Exception:  # noqa: BLE001 - the index promised a tensor the shard does not hold
        raise ConvertError(f"'{name}' is not in '{path}' although {INDEX} says so; download the shard again") from None


def shard_map(hf_dir: Path) -> dict[str, str]:
    """Tensor name -> shard file name: from the index when there is one (every shard it names must be
    there), else from the headers of every *.safetensors file in the folder."""
    index = hf_dir / INDEX
    if index.is_file():
        try:
            where = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise ConvertError(f"'{index}' is not a safetensors index (JSON with a 'weight_map')") from None
        missing = sorted({f for f in where.values() if not (hf_dir / f).is_file()})
        if missing:
            n = sum(f == missing[0] for f in where.values())
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ConvertError(
                f"shard '{missing[0]}'{more} is named in {INDEX} ({n} tensors) but is not in '{hf_dir}'; "
                "download it again"
            )
        return where
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ConvertError(
            f"no *.safetensors files in '{hf_dir}' (pytorch_model.bin checkpoints: re-save with safetensors)"
        )
    where = {}
    for path in files:
        with _open(path) as f:
            where.update(dict.fromkeys(f.keys(), path.name))
    return where


def iter_hf_tensors(
    hf_dir: Path, hf: dict, skip: Callable[[str], bool] | None = None
) -> Iterator[tuple[str, torch.Tensor | None]]:
    """(name, tensor) for every weight of an HF folder, one at a time, shard by shard. FP8 weights come out
    dequantised to the config's dtype (`torch_dtype`/`dtype`), their scales consumed on the way. Names for
    which `skip(name)` holds are not read: they come out as (name, None)."""
    block = fp8_block_size(hf)
    dtype_name = str(hf.get("torch_dtype") or hf.get("dtype") or "float32")
    dtype = getattr(torch, dtype_name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConvertError(f"dtype {dtype_name!r} in config.json is not a torch floating-point dtype")
    where = shard_map(hf_dir)
    by_file: dict[str, list[str]] = {}
    for name, file in where.items():
        by_file.setdefault(file, []).append(name)
    for file in sorted(by_file):
        with _open(hf_dir / file) as f:
            for name in by_file[file]:
                if name.endswith(SCALE):
                    if name.removesuffix(SCALE) not in where:
                        raise ConvertError(f"'{name}' has no weight '{name.removesuffix(SCALE)}' in the checkpoint")
                    continue  # read with its weight
                if skip is not None and skip(name):
                    yield name, None
                    continue
                t = _get(f, name, hf_dir / file)
                if name + SCALE in where:
                    t = _dequantize(f, file, name, t, where, hf_dir, block, dtype)
                elif t.dtype in FP8_DTYPES:
                    raise ConvertError(f"'{name}' is {t.dtype} but has no '{name + SCALE}' to dequantise it with")
                yield name, t


def _dequantize(f, file: str, name: str, t: torch.Tensor, where: dict, hf_dir: Path, block, dtype) -> torch.Tensor:
    if block is None:
        raise ConvertError(
            f"'{name + SCALE}' is an FP8 scale but config.json has no quantization_config; "
            "add the one the checkpoint was published with"
        )
    if where[name + SCALE] == file:
        scale = _get(f, name + SCALE, hf_dir / file)
    else:
        with _open(hf_dir / where[name + SCALE]) as g:
            scale = _get(g, name + SCALE, hf_dir / where[name + SCALE])
    return dequantize_fp8(t, scale, block, dtype, name)


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


Sink = Callable[[str, torch.Tensor, "int | None"], None]  # (nanoKimi key, tensor, expert index or None)


def kimi_state_from_hf(
    hf_tensors: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor | None]],
    cfg: KimiConfig,
    n_mtp: int = 0,
    sink: Sink | None = None,
) -> dict[str, torch.Tensor]:
    """nanoKimi's state dict from HF tensors (a dict, or (name, tensor) pairs streamed one at a time). Each
    tensor is checked against the shape `cfg` implies and placed as it comes: routed experts go straight
    into their stacked (E, ...) tensor, never held twice. Tensors of the `n_mtp` multi-token-prediction
    layers (index cfg.n_layer and beyond) are skipped. With `sink`, each checked tensor goes to
    `sink(key, tensor, expert)` instead and {} is returned; a None tensor (not read, see iter_hf_tensors)
    still counts as present."""
    from kimi.model import KimiModel

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in KimiModel(cfg).state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    experts_seen: dict[str, set[int]] = {}
    placed: set[str] = set()

    def place(hf_key: str, key: str, t: torch.Tensor | None, expert: int | None = None) -> None:
        if key not in expected:
            raise ConvertError(f"unexpected tensor '{hf_key}' in the HF checkpoint (no '{key}' in this model)")
        placed.add(key)
        if expert is not None:
            experts_seen.setdefault(key, set()).add(expert)
        if t is None:
            return
        want = expected[key] if expert is None else expected[key][1:]
        if tuple(t.shape) != want:
            raise ConvertError(
                f"'{hf_key}' has shape {tuple(t.shape)} but config.json implies {want}; "
                "the weights and config.json come from different models"
            )
        if sink is not None:
            sink(key, t, expert)
        elif expert is None:
            out[key] = t
        else:
            if key not in out:
                out[key] = torch.empty(expected[key], dtype=t.dtype)
            out[key][expert] = t

    ours = {"gate": "w1", "up": "w3", "down": "w2"}
    items = hf_tensors.items() if isinstance(hf_tensors, dict) else hf_tensors
    for key, t in items:
        if key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            if key == "lm_head.weight" and cfg.tie_embeddings:
                continue  # the embedding is the head
            place(key, key.removeprefix("model."), t)
            continue
        m = _LAYER.match(key)
        if m is None:
            if key.endswith("rotary_emb.inv_freq"):
                continue
            raise ConvertError(f"unexpected tensor '{key}' in the HF checkpoint")
        layer = int(m.group(1))
        if cfg.n_layer <= layer < cfg.n_layer + n_mtp:
            continue  # a multi-token-prediction layer: not part of the model
        if em := _EXPERT.match(key):
            expert = int(em.group(2))
            if expert >= cfg.moe.num_experts:
                raise ConvertError(f"'{key}': expert {expert}, but config.json has {cfg.moe.num_experts} experts")
            place(key, f"layers.{layer}.ffn.experts.{ours[em.group(3)]}", t, expert)
        elif fm := _FUSED.match(key):
            pre = f"layers.{layer}.ffn.experts."
            if fm.group(2) == "down_proj":
                place(key, pre + "w2", t)
            elif t is None:
                place(key, pre + "w1", None)
            else:  # gate_up_proj (E, 2F, D): gate rows first, then up (HF chunks it in two)
                w1, w3 = (c.contiguous() for c in t.chunk(2, dim=1))
                place(key, pre + "w1", w1)
                place(key, pre + "w3", w3)
        else:
            rest = m.group(2)
            for pat, rep in _RENAMES:  # in order: the router rules fire before the generic mlp. -> ffn.
                rest = re.sub(pat, rep, rest)
            place(key, f"layers.{layer}.{rest}", t)
    tied = {"lm_head.weight"} if cfg.tie_embeddings else set()
    if sink is not None and (missing := sorted(set(expected) - placed - tied)):
        raise ConvertError(f"'{missing[0]}' (and {len(missing) - 1} more) is not in the HF checkpoint")
    for key, seen in experts_seen.items():
        if len(seen) != cfg.moe.num_experts:
            gap = min(set(range(cfg.moe.num_experts)) - seen)
            raise ConvertError(f"'{key}': expert {gap} of {cfg.moe.num_experts} is missing from the HF checkpoint")
    if cfg.tie_embeddings and "embed_tokens.weight" in out:
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
    hf = json.loads((hf_dir / "config.json").read_text())
    cfg = kimi_config_from_hf(hf)
    n_mtp = hf.get("num_nextn_predict_layers") or 0
    if n_mtp:
        print(
            f"note: dropping num_nextn_predict_layers={n_mtp} (multi-token-prediction layers "
            f"model.layers.{cfg.n_layer}..{cfg.n_layer + n_mtp - 1}, skipped if present): nanoKimi has no MTP head"
        )
    sd = kimi_state_from_hf(iter_hf_tensors(hf_dir, hf), cfg, n_mtp)
    with torch.device("meta"):
        model = KimiModel(cfg)
    return cfg, check_state_dict(model, sd)


# ----------------------------------------------------------------------------- into a sharded model


def read_hf_config(hf_dir: str | Path) -> dict:
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise ConvertError(f"'{hf_dir}' has no config.json; expected a Hugging Face model directory")
    try:
        return json.loads((hf_dir / "config.json").read_text())
    except ValueError as e:
        raise ConvertError(f"'{hf_dir / 'config.json'}' is not valid JSON ({e})") from None


# The KimiConfig fields an HF config.json decides (the rest: how this run trains, and block_size, the
# context it trains at, which may be shorter than max_position_embeddings).
_FROM_HF = ("n_layer", "n_head", "n_embd", "vocab_size", "intermediate_size", "rms_norm_eps", "tie_embeddings",
            "mlp", "pos_emb", "norm", "attention.", "moe.use_moe", "moe.num_experts", "moe.top_k", "moe.expert_hidden",
            "moe.n_shared_experts", "moe.score_func", "moe.norm_topk_prob", "moe.routed_scaling_factor",
            "moe.n_group", "moe.topk_group", "moe.first_k_dense_replace")  # fmt: skip
_NOT_FROM_HF = ("attention.track_max_logits", "attention.bias")


def model_fields_from_hf(hf_dir: str | Path) -> dict:
    """{dotted model field: value} that the folder's config.json decides (for `--init-from-hf DIR`)."""
    import dataclasses

    from kimi.config import flatten_dict

    flat = flatten_dict(dataclasses.asdict(kimi_config_from_hf(read_hf_config(hf_dir))))
    return {k: v for k, v in flat.items() if k.startswith(_FROM_HF) and k not in _NOT_FROM_HF}


def check_model_matches_hf(model_cfg: KimiConfig, hf_dir: str | Path) -> None:
    """ConvertError (one line) naming the model fields that differ from the folder's config.json."""
    import dataclasses

    from kimi.config import flatten_dict

    ours = flatten_dict(dataclasses.asdict(model_cfg))
    diff = [f"model.{k}={ours.get(k)!r} vs {v!r}" for k, v in model_fields_from_hf(hf_dir).items() if ours.get(k) != v]
    if diff:
        raise ConvertError(
            f"train.init_from_hf: the model differs from '{hf_dir}/config.json' ({', '.join(diff[:4])}"
            f"{', ...' if len(diff) > 4 else ''}); start with --init-from-hf {hf_dir}, which sets them"
        )


def _local_part(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """This rank's part of a (possibly DTensor) parameter, sharing its storage, and where it starts."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return t.to_local(), tuple(offset)
    return t, (0,) * t.dim()


def load_hf_into(model: torch.nn.Module, hf_dir: str | Path, cfg: KimiConfig) -> int:
    """Overwrite `model`'s parameters and buffers, in place, with an HF folder's weights; returns how many HF
    tensors this rank read. `model` may be sharded (FSDP2 DTensors, EP): each rank copies only its own part,
    and routed experts it does not hold are never read. Peak memory: its shards plus one HF tensor. The
    folder is checked as kimi.convert checks it (shapes, missing tensors and experts, FP8 scales)."""
    hf_dir = Path(hf_dir)
    hf = read_hf_config(hf_dir)
    targets = {k: _local_part(v) for k, v in model.state_dict().items()}
    ours = {"gate": "w1", "up": "w3", "down": "w2"}
    read = 0

    def held(key: str, expert: int) -> bool:
        local, offset = targets[key]
        return offset[0] <= expert < offset[0] + local.shape[0]

    def skip(name: str) -> bool:
        m = _EXPERT.match(name)
        key = m and f"layers.{m.group(1)}.ffn.experts.{ours[m.group(3)]}"
        return bool(key) and key in targets and not held(key, int(m.group(2)))

    def sink(key: str, t: torch.Tensor, expert: int | None) -> None:
        nonlocal read
        read += 1
        local, offset = targets[key]
        if expert is not None:
            if not held(key, expert):
                return
            local, offset = local[expert - offset[0]], offset[1:]
        region = tuple(slice(o, o + n) for o, n in zip(offset, local.shape))
        with torch.no_grad():
            local.copy_(t[region])

    n_mtp = hf.get("num_nextn_predict_layers") or 0
    kimi_state_from_hf(iter_hf_tensors(hf_dir, hf, skip), cfg, n_mtp, sink)
    return read
