"""The one typed config tree.

    Config
      model: KimiConfig           n_layer, n_head, n_embd, vocab_size, block_size, ...
        attention: AttentionConfig  MLA (or plain MHA for the dense baseline)
        moe: MoEConfig              routed + shared experts, aux-loss-free routing
      optim: OptimConfig          Muon/AdamW, QK-clip, schedule
      train: TrainConfig          steps, batch, eval, checkpoints
      data: DataConfig            dataset, tokenizer
      parallel: ParallelConfig    dp_replicate x dp_shard, ep
      logging: LoggingConfig      metrics.jsonl, MLflow

Filled from defaults < YAML (`configs/*.yaml`) < command line (`--section.key=value`).
`attention` and `moe` are also accepted as top-level sections (short for `model.attention`,
`model.moe`), so `--moe.num_experts=16` works. Each component receives only its own sub-config.

Unknown keys and wrong types raise `ConfigError` naming the key and the nearest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config problem, phrased as one line that says what is wrong and how to fix it."""


# ----------------------------------------------------------------------------- sections


@dataclass
class AttentionConfig:
    type: str = "mla"  # "mla" (Kimi K2 / DeepSeek-V3) or "mha" (nanoGPT baseline)
    q_lora_rank: int | None = None  # None: plain q projection; else low-rank q with RMSNorm on the latent
    kv_lora_rank: int = 64  # compressed KV latent width (what the inference cache stores)
    qk_nope_head_dim: int = 32  # per-head q/k dims that carry no position
    qk_rope_head_dim: int = 16  # decoupled RoPE dims; the RoPE key is shared by all heads
    v_head_dim: int = 32
    rope_theta: float = 10000.0
    rope_interleave: bool = True  # DeepSeek-V3 checkpoints store RoPE dims interleaved
    bias: bool = False  # biases on the attention projections (MHA baseline only)
    track_max_logits: bool = True  # record per-head max pre-softmax logit (needed by QK-clip)

    def validate(self, n_head: int, n_embd: int) -> None:
        if self.type not in ("mla", "mha"):
            raise ConfigError(f"attention.type={self.type!r} is not one of 'mla', 'mha'")
        if self.type == "mha" and n_embd % n_head != 0:
            raise ConfigError(f"model.n_embd={n_embd} must be divisible by model.n_head={n_head} for MHA")
        if self.qk_rope_head_dim % 2 != 0:
            raise ConfigError(f"attention.qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE rotates pairs)")
        if self.type == "mla":
            # Each of these widths at 0 builds a model that trains without a word but cannot work: an empty
            # latent carries no key/value content, and MLA's only positional signal is its RoPE dims.
            if self.kv_lora_rank < 1:
                raise ConfigError(
                    f"attention.kv_lora_rank={self.kv_lora_rank}: MLA's keys and values come from this latent, "
                    "so it must be >= 1 (e.g. 64 as in configs/debug.yaml)"
                )
            if self.qk_rope_head_dim < 2:
                raise ConfigError(
                    f"attention.qk_rope_head_dim={self.qk_rope_head_dim}: MLA sees token positions only through its "
                    "RoPE dims, so it must be an even number >= 2 (e.g. 16 as in configs/debug.yaml)"
                )
            if self.q_lora_rank is not None and self.q_lora_rank < 1:
                raise ConfigError(
                    f"attention.q_lora_rank={self.q_lora_rank} must be >= 1, or null for a plain q projection"
                )
            if self.qk_nope_head_dim < 0 or self.v_head_dim < 1:
                raise ConfigError(
                    f"attention.qk_nope_head_dim={self.qk_nope_head_dim} must be >= 0 and "
                    f"attention.v_head_dim={self.v_head_dim} >= 1"
                )


@dataclass
class MoEConfig:
    use_moe: bool = True  # False: every layer is a dense SwiGLU MLP
    num_experts: int = 8  # routed experts
    top_k: int = 2
    expert_hidden: int | None = None  # F, each expert's SwiGLU width; None -> model.intermediate_size // top_k
    n_shared_experts: int = 1  # always-on experts, fused into one SwiGLU of n_shared * expert_hidden
    score_func: str = "sigmoid"  # "sigmoid" (K2 / V3) or "softmax"
    norm_topk_prob: bool = True  # renormalise the chosen top-k weights to sum to 1
    routed_scaling_factor: float = 1.0  # multiplies the routed output (K2: 2.827)
    n_group: int = 1  # group-limited routing: experts split into n_group groups ...
    topk_group: int = 1  # ... tokens pick from the best topk_group groups only
    first_k_dense_replace: int = 0  # the first k layers use a dense MLP (K2: 1)
    aux_loss_free: bool = True  # per-expert selection bias, updated outside autograd
    bias_update_rate: float = 1e-3  # bias += rate * sign(mean_load - load)
    seq_aux_loss_coef: float = 0.0  # DeepSeek-V3 sequence-level balance loss (0 = off)
    aux_loss_coef: float = 0.0  # classic switch-transformer balance loss (0 = off)
    capacity_factor: float | None = None  # None: dropless; else each expert keeps <= cf * T*K/E tokens
    kernels: str = "torch"  # routing/permute path: "torch", "triton" (kimi.kernels) or "auto" (Triton on CUDA)

    def validate(self, n_layer: int) -> None:
        if not self.use_moe:
            return
        if self.num_experts < 1 or not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"moe.top_k={self.top_k} must be in [1, moe.num_experts={self.num_experts}]")
        if self.score_func not in ("sigmoid", "softmax"):
            raise ConfigError(f"moe.score_func={self.score_func!r} is not one of 'sigmoid', 'softmax'")
        if self.kernels not in ("torch", "triton", "auto"):
            raise ConfigError(f"moe.kernels={self.kernels!r} is not one of 'torch', 'triton', 'auto'")
        if self.kernels == "triton" and importlib.util.find_spec("triton") is None:
            raise ConfigError("moe.kernels=triton needs Triton: pip install triton (or set moe.kernels=torch)")
        if self.num_experts % self.n_group != 0:
            raise ConfigError(f"moe.num_experts={self.num_experts} must be divisible by moe.n_group={self.n_group}")
        if not 1 <= self.topk_group <= self.n_group:
            raise ConfigError(f"moe.topk_group={self.topk_group} must be in [1, moe.n_group={self.n_group}]")
        if self.top_k > self.topk_group * (self.num_experts // self.n_group):
            raise ConfigError(
                f"moe.top_k={self.top_k} exceeds the experts reachable in moe.topk_group={self.topk_group} groups"
            )
        if not 0 <= self.first_k_dense_replace <= n_layer:
            raise ConfigError(f"moe.first_k_dense_replace={self.first_k_dense_replace} must be in [0, {n_layer}]")


@dataclass
class KimiConfig:
    """The model's config: everything `KimiModel` needs, and nothing else."""

    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    vocab_size: int = 512
    block_size: int = 128  # longest context (RoPE table and KV cache size)
    intermediate_size: int | None = None  # dense SwiGLU hidden; None -> 4 * n_embd (rounded)
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = False
    init_std: float = 0.02
    # Baseline switches (kimi.bench builds the nanoGPT / GPT-2 equivalent from these); defaults are K2's.
    mlp: str = "swiglu"  # "swiglu" or "gelu" (GPT-2: down(gelu(up(x))), hidden 4 * n_embd by default)
    pos_emb: str = "rope"  # "rope" or "learned" (a block_size x n_embd position table added to the input)
    norm: str = "rmsnorm"  # "rmsnorm" or "layernorm" (no bias, eps 1e-5, as nanoGPT with bias=False)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self) -> None:
        # The programmatic form `KimiConfig(..., moe={"use_moe": True, ...})` takes dicts too.
        if isinstance(self.attention, dict):
            self.attention = from_dict(AttentionConfig, self.attention, "attention")
        if isinstance(self.moe, dict):
            self.moe = from_dict(MoEConfig, self.moe, "moe")
        if self.intermediate_size is None:  # GELU: GPT-2's 4x; SwiGLU: its 4x-equivalent in parameters
            self.intermediate_size = 4 * self.n_embd if self.mlp == "gelu" else _round_up(int(8 * self.n_embd / 3), 64)
        if self.moe.expert_hidden is None:
            self.moe.expert_hidden = max(1, self.intermediate_size // max(1, self.moe.top_k))
        self.validate()

    def validate(self) -> None:
        for k in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size"):
            if getattr(self, k) < 1:
                raise ConfigError(f"model.{k}={getattr(self, k)} must be >= 1")
        for key, valid in (
            ("mlp", ("swiglu", "gelu")),
            ("pos_emb", ("rope", "learned")),
            ("norm", ("rmsnorm", "layernorm")),
        ):
            if getattr(self, key) not in valid:
                raise ConfigError(f"model.{key}={getattr(self, key)!r} is not one of {', '.join(map(repr, valid))}")
        if self.pos_emb == "learned" and self.attention.type != "mha":
            raise ConfigError(
                "model.pos_emb=learned needs attention.type=mha (MLA's decoupled RoPE key is its position signal)"
            )
        self.attention.validate(self.n_head, self.n_embd)
        self.moe.validate(self.n_layer)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.moe.use_moe and layer_idx >= self.moe.first_k_dense_replace


@dataclass
class OptimConfig:
    name: str = "muon"  # "muon" (Muon for hidden matrices + AdamW for the rest) or "adamw"
    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    momentum: float = 0.95  # Muon
    nesterov: bool = True
    ns_steps: int = 5
    ns_dtype: str = "auto"  # Newton-Schulz dtype: "auto" (bf16 on CUDA and CPUs with native bf16), "bf16", "fp32"
    qk_clip: bool = True  # MuonClip: rescale q/k weights of heads whose max logit exceeds tau
    qk_clip_tau: float = 100.0
    schedule: str = "cosine"  # "cosine", "wsd" (warmup-stable-decay, K2) or "constant"
    warmup_steps: int = 10
    decay_fraction: float = 0.2  # WSD: the last fraction of training decays
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # global-norm clip; 0 disables

    def validate(self) -> None:
        if self.name not in ("muon", "adamw"):
            raise ConfigError(f"optim.name={self.name!r} is not one of 'muon', 'adamw'")
        if self.schedule not in ("cosine", "wsd", "constant"):
            raise ConfigError(f"optim.schedule={self.schedule!r} is not one of 'cosine', 'wsd', 'constant'")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr} must be > 0")
        if self.ns_dtype not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"optim.ns_dtype={self.ns_dtype!r} is not one of 'auto', 'bf16', 'fp32'")


@dataclass
class TrainConfig:
    max_steps: int = 20
    global_batch_size: int = 8  # sequences per optimizer step, whatever the number of processes
    micro_batch_size: int = 8  # sequences per forward; accumulation = global / (micro * dp)
    seed: int = 1337
    device: str = "auto"  # "auto" (cuda if present), "cpu", "cuda"
    dtype: str = "auto"  # "auto" (bf16 autocast on GPU, fp32 on CPU), "bf16", "fp32"
    compile: bool = False
    activation_checkpointing: bool = False
    log_interval: int = 1
    eval_interval: int = 0  # 0: no validation
    eval_batches: int = 4
    ckpt_interval: int = 0  # 0: only at the end
    keep_last: int = 2
    keep_best: bool = True
    out_dir: str = "out/debug"
    profile: bool = False  # time the all-to-alls and the optimizer step per step (adds syncs; for benches)
    resume: bool | None = None  # None: resume when out_dir has a checkpoint; True: must; False: must not
    # A step whose loss or gradient norm is NaN/inf (on any rank) never reaches the weights. "stop": end the
    # run there with one line and exit code 4 (checkpoints/latest stays on the last good checkpoint).
    # "skip": drop that step's update (no optimizer step, QK-clip or router-bias update; the data and the
    # lr schedule still advance) and go on; stop as above after more than max_nonfinite_skips in a row.
    nonfinite: str = "stop"
    max_nonfinite_skips: int = 3

    def validate(self) -> None:
        if self.micro_batch_size < 1 or self.global_batch_size < 1:
            raise ConfigError("train.global_batch_size and train.micro_batch_size must be >= 1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"train.device={self.device!r} is not one of 'auto', 'cpu', 'cuda'")
        if self.log_interval < 1:
            raise ConfigError(f"train.log_interval={self.log_interval} must be >= 1")
        if min(self.eval_interval, self.ckpt_interval, self.max_steps) < 0:
            raise ConfigError("train.eval_interval, train.ckpt_interval and train.max_steps must be >= 0")
        if self.eval_interval > 0 and self.eval_batches < 1:
            raise ConfigError(f"train.eval_batches={self.eval_batches} must be >= 1 when train.eval_interval > 0")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"train.dtype={self.dtype!r} is not one of 'auto', 'bf16', 'fp32'")
        if self.nonfinite not in ("stop", "skip"):
            raise ConfigError(f"train.nonfinite={self.nonfinite!r} is not one of 'stop', 'skip'")
        if self.max_nonfinite_skips < 0:
            raise ConfigError(f"train.max_nonfinite_skips={self.max_nonfinite_skips} must be >= 0")


@dataclass
class DataConfig:
    dataset: str = "toy"  # "toy" (random tokens, zero setup) or a directory written by `kimi.prepare`
    tokenizer_name: str = "gpt2"  # "gpt2" or "byte" (257 ids); must match what `kimi.prepare --tokenizer` used
    block_size: int | None = None  # training window; None -> model.block_size
    num_workers: int = 2  # tokenisation processes in `kimi.prepare`
    shard_tokens: int = 50_000_000  # tokens per shard file
    cache_dir: str | None = None  # named-corpus downloads; None -> $NANOKIMI_CACHE or ~/.cache/nanokimi
    # Check each shard's sha256 against the manifest: the first open of a file reads it all (seconds per GB),
    # later opens reuse the cached verdict while its size and mtime are unchanged. Sizes and headers are
    # always checked.
    verify_shards: bool = True


@dataclass
class ParallelConfig:
    dp_replicate: int = 1  # HSDP replicas (groups that each hold a full FSDP-sharded copy)
    dp_shard: int = -1  # FSDP degree; -1: the rest of the world
    ep: int = 1  # expert-parallel degree (divides num_experts)
    backend: str = "auto"  # "auto" (nccl on CUDA, gloo on CPU), "nccl", "gloo"
    engine: str = "fsdp2"  # what wraps the model and steps it: "fsdp2" or "deepspeed" (kimi/engine/)
    zero_stage: int = 1  # deepspeed: ZeRO stage 1 (optimizer state) or 2 (+ gradients) partitioned over ranks
    deepspeed_config: str | None = None  # deepspeed: a JSON file merged over the config generated from ours

    def __post_init__(self) -> None:
        if self.engine not in ("fsdp2", "deepspeed"):
            raise ConfigError(f"parallel.engine={self.engine!r} is not one of 'fsdp2', 'deepspeed'")
        if self.zero_stage == 3:
            # DeepSpeed's MoE refuses ZeRO-3 (it points to AutoEP), and AutoEP's presets reject aux-loss-free bias.
            raise ConfigError(
                "parallel.zero_stage=3 is not supported (DeepSpeed ZeRO-3 does not take our expert-parallel MoE); use 1 or 2"
            )
        if self.zero_stage not in (1, 2):
            raise ConfigError(f"parallel.zero_stage={self.zero_stage} must be 1 or 2")


@dataclass
class LoggingConfig:
    mlflow: bool = True
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<out_dir>/mlflow.db
    experiment: str = "nanokimi"
    run_name: str | None = None
    system_metrics_interval: float = 10.0  # seconds between CPU/RSS/GPU-memory samples
    flush_interval: float = 5.0  # seconds between MLflow log_batch calls
    retry_interval: float = 60.0  # after an MLflow failure (warned once), seconds between reconnection attempts
    finish_timeout: float = 15.0  # Tracker.finish waits at most this long for MLflow (a dead server must not hang exit)
    plot_log_y: bool = False  # log-scale y axis for the loss curve drawn at the end of the run


@dataclass
class Config:
    model: KimiConfig = field(default_factory=KimiConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> Config:
        self.model.validate()
        self.optim.validate()
        self.train.validate()
        if self.optim.qk_clip and not self.model.attention.track_max_logits:
            # QK-clip reads the recorded maxima; untracked they stay 0 and no head is ever clipped.
            raise ConfigError(
                "optim.qk_clip=true needs the per-head max logits that attention.track_max_logits=false turns off; "
                "set --attention.track_max_logits=true, or --optim.qk_clip=false to train without QK-clip"
            )
        return self

    @property
    def block_size(self) -> int:
        return self.data.block_size or self.model.block_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(_plain(self.to_dict()), sort_keys=False)


# ----------------------------------------------------------------------------- building

# Top-level sections that live inside another one.
_ALIASES = {"attention": ("model", "attention"), "moe": ("model", "moe")}


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _suggest(key: str, valid: typing.Iterable[str]) -> str:
    near = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"; did you mean '{near[0]}'?" if near else f"; valid keys: {', '.join(sorted(valid))}"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and, for strings from the command line, parse) `value` against the annotation `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: cannot be None")
    if origin is tuple:
        if isinstance(value, str):
            value = yaml.safe_load(value if value.startswith("[") else f"[{value}]")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} should be a list like [0.9, 0.95]")
        inner = typing.get_args(tp)
        if len(inner) != len(value):
            raise ConfigError(f"{key}={value!r} should have {len(inner)} entries")
        return tuple(_coerce(v, t, key) for v, t in zip(value, inner))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}={value!r} should be true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} should be an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} should be an integer")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} should be a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} should be a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r} should be a string")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return from_dict(tp, value, key)
        raise ConfigError(f"{key} should be a mapping of {tp.__name__} fields")
    return value


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a (nested) dict, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__} should be a mapping, got {type(data).__name__}")
    fields = _fields(cls)
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            raise ConfigError(f"unknown config key '{name}'{_suggest(key, fields)}")
        kwargs[key] = _coerce(value, fields[key], name)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    if path[0] in _ALIASES:
        path = list(_ALIASES[path[0]]) + path[1:]
    node = tree
    for p in path[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"'{'.'.join(path)}': '{p}' is a value, not a section")
    node[path[-1]] = value


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _normalise(tree: dict[str, Any]) -> dict[str, Any]:
    """Move top-level `attention:` / `moe:` sections under `model:`."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if k in _ALIASES:
            out = _merge(out, {_ALIASES[k][0]: {_ALIASES[k][1]: v}})
        else:
            out = _merge(out, {k: v})
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist; the shipped ones are in configs/")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' should hold a mapping of sections (model:, train:, ...)")
    return data


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`['--moe.num_experts=16', '--train.compile', 'true']` -> nested dict (values still strings)."""
    tree: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"cannot read argument '{arg}': overrides look like --section.key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
            else:
                value = "true"  # a bare flag: --train.compile
        _set_path(tree, key.split("."), yaml.safe_load(value) if value != "" else "")
        i += 1
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Defaults < YAML file < overrides (a list of `--section.key=value` or a nested dict)."""
    tree = _normalise(load_yaml(path)) if path else {}
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    if overrides:
        tree = _merge(tree, _normalise(overrides))
    for section in tree:
        if section not in _fields(Config):
            raise ConfigError(
                f"unknown config section '{section}'{_suggest(section, list(_fields(Config)) + list(_ALIASES))}"
            )
    return from_dict(Config, tree).validate()


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild a Config from `Config.to_dict()` (e.g. the copy stored in a checkpoint)."""
    return from_dict(Config, _normalise(tree)).validate()


def merge_dicts(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` merged into a copy of `base`, recursively for nested dicts."""
    return _merge(base, over)


def flatten_dict(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten_dict(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_help() -> str:
    """Every config field with its type, default and doc (placeholder until the config library lands)."""
    return ""
