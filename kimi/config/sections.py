"""The sections of the config tree: one pydantic dataclass per component, each field with its default and,
beside it, the one-line comment that is its --help text (kimi/config_help.py)."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import field
from pathlib import PurePath
from typing import Any

import pydantic
import yaml

from kimi.config.build import ConfigError, _plain, _round_up, section


@section("attention.rope_scaling")
class RopeScalingConfig:
    """RoPE context extension (YaRN, as Kimi K2 and DeepSeek-V3 publish it); type "none" is plain RoPE."""

    type: str = "none"  # "none" (plain RoPE) or "yarn"
    factor: float = 1.0  # context extension: positions up to factor x original_max_position_embeddings
    original_max_position_embeddings: int = 4096  # the context the model was pre-trained at
    beta_fast: float = 32.0  # rotations above which a frequency is kept as is (extrapolated)
    beta_slow: float = 1.0  # rotations below which a frequency is divided by factor (interpolated)
    mscale: float = 1.0  # cos/sin scale 0.1*mscale*ln(factor)+1, over the same with mscale_all_dim
    mscale_all_dim: float = 0.0  # >0: also scale attention logits by (0.1*mscale_all_dim*ln(factor)+1)^2

    def __post_init__(self) -> None:
        if self.type not in ("none", "yarn"):
            raise ConfigError(f"attention.rope_scaling.type={self.type!r} is not one of 'none', 'yarn'")
        if self.type == "yarn" and (self.factor < 1.0 or self.original_max_position_embeddings < 1):
            raise ConfigError(
                f"attention.rope_scaling: factor={self.factor} must be >= 1 and original_max_position_embeddings="
                f"{self.original_max_position_embeddings} >= 1 for YaRN"
            )


@section("attention")
class AttentionConfig:
    """Attention: MLA (Kimi K2 / DeepSeek-V3) or plain MHA."""

    type: str = "mla"  # "mla" (Kimi K2 / DeepSeek-V3) or "mha" (nanoGPT baseline)
    q_lora_rank: int | None = None  # None: plain q projection; else low-rank q with RMSNorm on the latent
    kv_lora_rank: int = 64  # compressed KV latent width (what the inference cache stores)
    qk_nope_head_dim: int = 32  # per-head q/k dims that carry no position
    qk_rope_head_dim: int = 16  # decoupled RoPE dims; the RoPE key is shared by all heads
    v_head_dim: int = 32  # per-head value dims
    rope_theta: float = 10000.0  # RoPE base frequency
    rope_interleave: bool = True  # DeepSeek-V3 checkpoints store RoPE dims interleaved
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)  # YaRN; takes a dict too
    bias: bool = False  # biases on the attention projections (MHA baseline only)
    track_max_logits: bool = True  # record per-head max pre-softmax logit (needed by QK-clip)
    recompute_kv: bool = False  # MLA: rebuild per-head K/V from the latent in backward instead of keeping them

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


@section("moe")
class MoEConfig:
    """Mixture of experts: routed + shared experts, aux-loss-free routing."""

    use_moe: bool = True  # False: every layer is a dense SwiGLU MLP
    num_experts: int = 8  # routed experts
    top_k: int = 2  # routed experts per token
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
    recompute: bool = False  # recompute the gathered rows and SwiGLU products in backward (keep W1x, W3x)

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


@section("model")
class KimiConfig:
    """The model's config: everything `KimiModel` needs, and nothing else."""

    n_layer: int = 2  # transformer blocks
    n_head: int = 4  # attention heads
    n_embd: int = 128  # model width D
    vocab_size: int = 512  # embedding rows; must cover the tokenizer's ids (gpt2: 50257, byte: 257)
    block_size: int = 128  # longest context (RoPE table and KV cache size)
    intermediate_size: int | None = None  # dense SwiGLU hidden; None -> 4 * n_embd (rounded)
    rms_norm_eps: float = 1e-6  # RMSNorm epsilon
    tie_embeddings: bool = False  # share the input embedding with the output head
    init_std: float = 0.02  # std of the normal init of weights
    # Baseline switches (kimi.bench builds the nanoGPT / GPT-2 equivalent from these); defaults are K2's.
    mlp: str = "swiglu"  # "swiglu" or "gelu" (GPT-2: down(gelu(up(x))), hidden 4 * n_embd by default)
    pos_emb: str = "rope"  # "rope" or "learned" (a block_size x n_embd position table added to the input)
    norm: str = "rmsnorm"  # "rmsnorm" or "layernorm" (no bias, eps 1e-5, as nanoGPT with bias=False)
    # Training's cross-entropy from the final hidden state, this many tokens at a time, each chunk's gradient
    # computed in forward (kimi/model/loss.py): the (tokens, vocab) fp32 logits never exist whole, and
    # ModelOutput.logits is None when targets are given. 0: the full logits, then F.cross_entropy.
    loss_chunk_tokens: int = 1024  # chunked (fused) linear cross-entropy, tokens per chunk; 0 = full logits
    attention: AttentionConfig = field(default_factory=AttentionConfig)  # takes a dict too
    moe: MoEConfig = field(default_factory=MoEConfig)  # takes a dict too

    def __post_init__(self) -> None:
        if self.intermediate_size is None:  # GELU: GPT-2's 4x; SwiGLU: its 4x-equivalent in parameters
            self.intermediate_size = 4 * self.n_embd if self.mlp == "gelu" else _round_up(int(8 * self.n_embd / 3), 64)
        if self.moe.expert_hidden is None:
            self.moe.expert_hidden = max(1, self.intermediate_size // max(1, self.moe.top_k))
        self.validate()

    def validate(self) -> None:
        for k in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size"):
            if getattr(self, k) < 1:
                raise ConfigError(f"model.{k}={getattr(self, k)} must be >= 1")
        if self.loss_chunk_tokens < 0:
            raise ConfigError(f"model.loss_chunk_tokens={self.loss_chunk_tokens} must be >= 0 (0: the full logits)")
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


NS_DEFAULT_STEPS = {"quintic": 5, "polar_express": 4}  # Newton-Schulz method -> its default iteration count


@section("optim")
class OptimConfig:
    """Optimizer: Muon/AdamW, QK-clip, learning-rate schedule."""

    name: str = "muon"  # "muon" (Muon for hidden matrices + AdamW for the rest) or "adamw"
    lr: float = 3e-3  # peak learning rate
    weight_decay: float = 0.1  # decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas (on the command line: [0.9,0.95] or 0.9,0.95)
    eps: float = 1e-8  # AdamW epsilon
    momentum: float = 0.95  # Muon momentum
    nesterov: bool = True  # Muon: Nesterov momentum
    # "polar_express": a minimax polynomial per iteration (Amsel et al. 2025), see kimi/optim/newton_schulz.py.
    ns_method: str = "quintic"  # Muon's Newton-Schulz polynomials: "quintic" (fixed) or "polar_express" (per step)
    ns_steps: int | None = None  # Muon: Newton-Schulz iterations; None: the method's own (NS_DEFAULT_STEPS), filled in
    # ns_gram: the same map in fewer FLOPs (0.80x Newton-Schulz's time on an AVX2 EPYC), but fp32 only.
    ns_gram: bool | str = "auto"  # NS on X X^T for matrices >= 1.5x wider than tall; "auto": wherever NS runs fp32
    ns_dtype: str = "auto"  # Newton-Schulz dtype: "auto" (bf16 on CUDA and CPUs with native bf16), "bf16", "fp32"
    qk_clip: bool = True  # MuonClip: rescale q/k weights of heads whose max logit exceeds tau
    qk_clip_tau: float = 100.0  # QK-clip threshold on the max pre-softmax logit
    schedule: str = "cosine"  # "cosine", "wsd" (warmup-stable-decay, K2) or "constant"
    warmup_steps: int = 10  # linear warmup from 0
    decay_fraction: float = 0.2  # WSD: the last fraction of training decays
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    expert_lr_mult: float = 1.0  # routed experts' lr = lr x this (they see ~top_k/num_experts of the tokens)
    # "adamw" spares the routed experts Newton-Schulz, most of Muon's FLOPs in a fine-grained MoE (K2: "muon")
    expert_optimizer: str = "muon"  # routed experts' optimizer under muon: "muon" or "adamw" (at lr x expert_lr_mult)

    def validate(self) -> None:
        if self.name not in ("muon", "adamw"):
            raise ConfigError(f"optim.name={self.name!r} is not one of 'muon', 'adamw'")
        if self.schedule not in ("cosine", "wsd", "constant"):
            raise ConfigError(f"optim.schedule={self.schedule!r} is not one of 'cosine', 'wsd', 'constant'")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr} must be > 0")
        if not self.expert_lr_mult > 0:
            raise ConfigError(f"optim.expert_lr_mult={self.expert_lr_mult} must be > 0")
        if self.expert_optimizer not in ("muon", "adamw"):
            raise ConfigError(f"optim.expert_optimizer={self.expert_optimizer!r} must be 'muon' or 'adamw'")
        if self.ns_dtype not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"optim.ns_dtype={self.ns_dtype!r} is not one of 'auto', 'bf16', 'fp32'")
        if self.ns_method not in ("quintic", "polar_express"):
            raise ConfigError(f"optim.ns_method={self.ns_method!r} is not one of 'quintic', 'polar_express'")
        if self.ns_steps is None:  # stored resolved: a checkpoint's config says how many iterations it ran
            self.ns_steps = NS_DEFAULT_STEPS[self.ns_method]
        if self.ns_steps < 1:
            raise ConfigError(f"optim.ns_steps={self.ns_steps} must be >= 1")
        if self.ns_gram not in (True, False, "auto"):
            raise ConfigError(f"optim.ns_gram={self.ns_gram!r} is not one of true, false, 'auto'")
        if self.ns_gram is True and self.ns_dtype == "bf16":
            raise ConfigError("optim.ns_gram=true needs optim.ns_dtype=fp32 or auto (Gram iterations drift in bf16)")


@section("train")
class TrainConfig:
    """The run: steps, batch, device, evaluation, checkpoints."""

    max_steps: int = 20  # optimizer steps
    global_batch_size: int = 8  # sequences per optimizer step, whatever the number of processes
    micro_batch_size: int = 8  # sequences per forward; accumulation = global / (micro * dp)
    seed: int = 1337  # model init and data order
    device: str = "auto"  # "auto" (cuda if present), "cpu", "cuda"
    dtype: str = "auto"  # "auto" (bf16 autocast on GPU, fp32 on CPU), "bf16", "fp32"
    # CPU: glibc's malloc keeps freed memory for reuse instead of unmapping every block of 32 MiB and more, whose
    # pages a step would fault in again (~10% of a MoE step at byte_s; kimi/host_memory.py). RSS then stays at its
    # peak. Off by itself when MALLOC_*_ or GLIBC_TUNABLES set glibc's malloc.
    cpu_keep_freed_memory: bool = True  # CPU: no page faults on reallocated big tensors; RSS stays at its peak
    compile: bool = False  # torch.compile each block
    # torch.compile only the blocks' elementwise chains (RMSNorm, SwiGLU, the routed rows' weighting): one fused
    # kernel each way instead of a pass over memory per op; matmuls stay eager. Pays on CPU (~1.05x tokens/s at byte
    # level, docs/benchmarking.md), where compiling whole blocks does not. Needs a C++ compiler. Implied by train.compile.
    fused_elementwise: bool = False  # torch.compile the blocks' elementwise chains only
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    log_interval: int = 1  # steps between log lines
    eval_interval: int = 0  # 0: no validation
    eval_batches: int = 4  # validation batches per evaluation
    ckpt_interval: int = 0  # 0: only at the end
    keep_last: int = 2  # step checkpoints kept
    keep_best: bool = True  # also keep the checkpoint with the best validation loss
    out_dir: str = "out/debug"  # checkpoints, metrics.jsonl, plots
    profile: bool = False  # phase times (fwd/bwd/optim ms, all-to-alls) in each metrics row (adds syncs); no trace
    # torch.profiler over steps A..B (inclusive): one Chrome/Perfetto trace per rank in
    # out_dir/profile/rank{r}_steps_A-B.json (open in ui.perfetto.dev), also an MLflow artifact under profile/.
    profile_steps: str | None = None  # "A:B" (e.g. "3:5"): torch.profiler trace of steps A..B per rank
    memory_snapshot: bool = False  # CUDA only: record allocator history over profile_steps, dump a snapshot
    # Write checkpoints with torch.distributed.checkpoint's async_save: the step loop waits only while the
    # state is copied to host memory; shards, checksums, the rename and `latest` follow in the background
    # (a save waits for the previous one first; the last save of a run is waited for). FSDP2 only.
    async_checkpoint: bool = False  # write checkpoints in the background (FSDP2)
    resume: bool | None = None  # None: resume when out_dir has a checkpoint; True: must; False: must not
    # A Hugging Face DeepSeek-V3 / Kimi-K2 folder whose weights start a fresh run (a resume ignores it): each
    # rank reads only what its shards hold. model.* must be its config.json (`--init-from-hf DIR` sets them).
    init_from_hf: str | None = None  # HF folder to start from (FSDP2)
    # A step whose loss or gradient norm is NaN/inf (on any rank) never reaches the weights. "stop": end the
    # run there with one line and exit code 4 (checkpoints/latest stays on the last good checkpoint).
    # "skip": drop that step's update (no optimizer step, QK-clip or router-bias update; the data and the
    # lr schedule still advance) and go on; stop as above after more than max_nonfinite_skips in a row.
    nonfinite: str = "stop"  # a NaN/inf step: "stop" the run (exit code 4) or "skip" its update
    max_nonfinite_skips: int = 3  # "skip": stop after more than this many in a row

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
        self.profile_window()
        if self.memory_snapshot and self.profile_steps is None:
            raise ConfigError(
                "train.memory_snapshot=true records over train.profile_steps; set --train.profile_steps=A:B"
            )

    def profile_window(self) -> tuple[int, int] | None:
        """`profile_steps` as (first, last) steps, both profiled; None when unset. ConfigError (one line)
        for anything but two whole numbers 1 <= A <= B."""
        if self.profile_steps is None:
            return None
        a, colon, b = str(self.profile_steps).partition(":")
        if not (colon and a.strip().isdigit() and b.strip().isdigit() and 1 <= int(a) <= int(b)):
            raise ConfigError(
                f"train.profile_steps={self.profile_steps!r} should be A:B, the first and last step to profile "
                "with 1 <= A <= B, e.g. --train.profile_steps=3:5"
            )
        return int(a), int(b)


@section("data.mix")
class MixSource:
    """One source of a data mixture: a prepared dataset and its share of the windows."""

    path: str  # a directory written by `kimi.prepare` (its root or one split dir)
    weight: float  # relative share of each step's windows (normalised over the sources)
    name: str | None = None  # metrics key `mix_frac/<name>`; None -> the path's last folder name

    def __post_init__(self) -> None:
        if not math.isfinite(self.weight) or self.weight <= 0:
            raise ConfigError(f"data.mix weight {self.weight} of '{self.path}' must be a finite number > 0")
        if self.name is None:
            self.name = PurePath(self.path.rstrip("/")).name or self.path


def _parse_mix(value: Any) -> Any:
    """`PATH:WEIGHT,PATH:WEIGHT` (the command line) -> [{path, weight}, ...]; YAML lists pass through."""
    if not isinstance(value, str):
        return value
    out = []
    for item in filter(None, (v.strip() for v in value.split(","))):
        path, colon, weight = item.rpartition(":")
        if not colon or not path:
            raise ConfigError(f"data.mix entry '{item}' should be PATH:WEIGHT, e.g. --data.mix=data/a:0.7,data/b:0.3")
        out.append({"path": path, "weight": weight})
    return out


# The tokenizer names kimi/data/tokenizer.py builds (TOKENIZERS, FILE_KINDS there; a unit test keeps the two
# lists equal): config sits below kimi.data and cannot import them, but must refuse a name nothing can build.
TOKENIZER_NAMES = ("gpt2", "byte")
FILE_TOKENIZER_KINDS = ("tiktoken", "hf")


def _is_tokenizer_name(name: str) -> bool:
    kind, colon, path = name.partition(":")
    return name in TOKENIZER_NAMES or bool(colon and kind in FILE_TOKENIZER_KINDS and path)


@section("data")
class DataConfig:
    """Training data: dataset, tokenizer, and how `kimi.prepare` writes shards."""

    dataset: str = "toy"  # "toy" (random tokens), a directory written by `kimi.prepare`, or package.module:factory
    tokenizer_name: str = "gpt2"  # gpt2, byte (257 ids), tiktoken:PATH or hf:PATH; as `kimi.prepare --tokenizer`
    block_size: int | None = None  # training window; None -> model.block_size
    num_workers: int = 2  # tokenisation processes in `kimi.prepare`
    shard_tokens: int = 50_000_000  # tokens per shard file
    cache_dir: str | None = None  # named-corpus downloads; None -> $NANOKIMI_CACHE or ~/.cache/nanokimi
    # Check each shard's sha256 against the manifest: the first open of a file reads it all (seconds per GB),
    # later opens reuse the cached verdict while its size and mtime are unchanged. Sizes and headers are
    # always checked.
    verify_shards: bool = True  # check each shard's sha256 against the manifest
    # Several prepared datasets with weights (YAML: [{path, weight, name}], CLI: PATH:WEIGHT,PATH:WEIGHT); each
    # step's windows are drawn from them by weight, from (seed, step). Empty: train on data.dataset alone.
    mix: list[MixSource] = field(default_factory=list)  # [{path, weight}] or PATH:WEIGHT,...; empty -> data.dataset

    @pydantic.field_validator("mix", mode="before")
    @classmethod
    def _mix_text(cls, value: Any) -> Any:
        return _parse_mix(value)

    def __post_init__(self) -> None:
        if not _is_tokenizer_name(self.tokenizer_name):
            raise ConfigError(
                f"data.tokenizer_name={self.tokenizer_name!r} is not a tokenizer; use gpt2, byte, "
                "tiktoken:PATH (a tiktoken BPE file) or hf:PATH (a Hugging Face tokenizer.json)"
            )
        if self.mix and self.dataset != "toy":
            raise ConfigError(
                f"data.mix and data.dataset={self.dataset!r} both name the training data; "
                "drop --data.dataset (the mixture's paths are the data)"
            )
        names = [m.name for m in self.mix]
        if dup := sorted({n for n in names if names.count(n) > 1}):
            raise ConfigError(f"data.mix names {dup} more than once; give each source a distinct `name:` in the YAML")


@section("parallel.deepspeed")
class DeepSpeedConfig:
    """DeepSpeed ZeRO (read when parallel.engine=deepspeed)."""

    zero_stage: int = 1  # ZeRO stage 1 (optimizer state) or 2 (+ gradients) partitioned over ranks
    config: str | None = None  # a JSON file merged over the DeepSpeed config generated from ours

    def __post_init__(self) -> None:
        if self.zero_stage == 3:
            # DeepSpeed's MoE refuses ZeRO-3 (it points to AutoEP), and AutoEP's presets reject aux-loss-free bias.
            raise ConfigError(
                "parallel.deepspeed.zero_stage=3 is not supported (DeepSpeed ZeRO-3 does not take our "
                "expert-parallel MoE); use 1 or 2"
            )
        if self.zero_stage not in (1, 2):
            raise ConfigError(f"parallel.deepspeed.zero_stage={self.zero_stage} must be 1 or 2")


@section("parallel")
class ParallelConfig:
    """Parallelism: the process mesh and the engine that wraps the model."""

    dp_replicate: int = 1  # HSDP replicas (groups that each hold a full FSDP-sharded copy)
    dp_shard: int = -1  # FSDP degree; -1: the rest of the world
    ep: int = 1  # expert-parallel degree (divides num_experts)
    backend: str = "auto"  # "auto" (nccl on CUDA, gloo on CPU), "nccl", "gloo"
    engine: str = "fsdp2"  # what wraps the model and steps it: "fsdp2" or "deepspeed" (kimi/engine/)
    timeout_s: float = 600.0  # seconds a collective waits for the other ranks; then the job stops (a hung rank)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)  # takes a dict too

    def __post_init__(self) -> None:
        if self.engine not in ("fsdp2", "deepspeed"):
            raise ConfigError(f"parallel.engine={self.engine!r} is not one of 'fsdp2', 'deepspeed'")
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ConfigError(f"parallel.timeout_s={self.timeout_s} must be a number of seconds > 0")


@section("logging")
class LoggingConfig:
    """Experiment tracking: MLflow, plots."""

    mlflow: bool = True  # log params, metrics and plots to MLflow (metrics.jsonl is always written)
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<out_dir>/mlflow.db
    experiment: str = "nanokimi"  # MLflow experiment name
    run_name: str | None = None  # MLflow run name; None: MLflow picks one
    system_metrics_interval: float = 10.0  # seconds between CPU/RSS/GPU-memory samples
    flush_interval: float = 5.0  # seconds between MLflow log_batch calls
    retry_interval: float = 60.0  # after an MLflow failure (warned once), seconds between reconnection attempts
    finish_timeout: float = 15.0  # Tracker.finish waits at most this long for MLflow (a dead server must not hang exit)
    plot_log_y: bool = False  # log-scale y axis for the loss curve drawn at the end of the run


@section("")
class Config:
    """The whole tree."""

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
        if self.train.async_checkpoint and self.parallel.engine == "deepspeed":
            raise ConfigError(
                "train.async_checkpoint=true is not supported by parallel.engine=deepspeed (its checkpoints are "
                "written synchronously); drop it, or use --parallel.engine=fsdp2"
            )
        if self.train.init_from_hf and self.parallel.engine == "deepspeed":
            raise ConfigError(
                "train.init_from_hf is not supported by parallel.engine=deepspeed (ZeRO copies the weights into "
                "its fp32 partitions at build); use --parallel.engine=fsdp2, or convert the folder with "
                "python -m kimi.convert --from-hf"
            )
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
