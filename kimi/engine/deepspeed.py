"""The DeepSpeed engine: our expert parallelism, then ZeRO-1/2 with our optimizer as DeepSpeed's client.

What is ours and what is DeepSpeed's:
- Expert parallelism stays ours: the all-to-all dispatcher and the (dp, ep) mesh of kimi.parallel. ZeRO
  flattens parameters into 1-D buffers and does not take DTensors, so after `apply_expert_parallel` each
  rank's expert shard becomes a plain Parameter again ((E/ep, F, D); the dispatcher takes plain local
  experts as well). Expert parameters are marked as DeepSpeed MoE parameters (`allreduce=False`,
  `group_name`) and put in MoE param groups whose name is that of an expert-data-parallel group we
  register in deepspeed.utils.groups from our own mesh (ep = our ep group, expert-dp = the ranks holding
  the same experts). ZeRO then partitions and reduces expert gradients over their replicas only, and
  divides by the whole data-parallel world, which is the gradient of the global mean loss (the same
  factor FSDP2 uses, kimi/parallel/fsdp.py). DeepSpeed enables that path only for models holding one of
  its own MoE layers; an empty marker module stands in for one while the engine is built.
- The optimizer is ours (kimi.optim.Muon: Muon + AdamW), DeepSpeed's client. ZeRO gives it one flat fp32
  partition per group: AdamW and momentum are elementwise, and Newton-Schulz runs on whole matrices cut
  from an all-gather of the partitions (kimi/optim/zero_muon.py), so the update is the FSDP2 engine's.
- The lr schedule, gradient clipping value, accumulation and batch sizes come from our config; the JSON
  DeepSpeed reads is generated from it (`ds_config`), and `parallel.deepspeed.config` may override it.
- Precision: bf16 on GPU (DeepSpeed casts parameters, keeps fp32 master weights in the ZeRO partitions
  and fp32 buffers), fp32 on CPU.
- Checkpoints: DeepSpeed's save_checkpoint/load_checkpoint as the writer/reader inside our atomic step
  directories (kimi.checkpoint.Checkpointer: tmp dir, checksums, rename, `latest`, rotation, failure
  handling). DeepSpeed writes the module from data-parallel rank 0 only, so each expert-parallel rank
  also writes its experts. Resuming needs the same world size and EP degree (ZeRO's partitions are per
  rank); `read_model_state` reads the weights on one process (generate, evaluate, convert).
- A NaN/inf step (train.nonfinite=skip) goes through DeepSpeed's own overflow path: nothing is stepped.

Refused: ZeRO-3 (parallel.deepspeed.zero_stage=3: DeepSpeed's native MoE refuses it, AutoEP rejects aux-loss-free
bias), HSDP (dp_replicate > 1), a user JSON that sets its own optimizer or scheduler, or ZeRO offload. DeepSpeed's
MuonWithAuxAdam is not offered: it has no QK-clip and had silent-correctness bugs; ours runs instead.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX

from kimi.checkpoint import CheckpointError, read_meta
from kimi.config import ConfigError, OptimConfig, ParallelConfig, TrainConfig, merge_dicts
from kimi.engine.base import Engine

_FORBIDDEN_KEYS = ("optimizer", "scheduler")  # ours come from optim.*; DeepSpeed's would replace them


DEEPSPEED_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size, in elements


def ds_config(
    optim: OptimConfig,
    parallel: ParallelConfig,
    t: TrainConfig,
    world: int,
    bf16: bool,
    local_params: int | None = None,
) -> dict[str, Any]:
    """The DeepSpeed JSON generated from our config, with `parallel.deepspeed.config` merged over it.

    `local_params` (this rank's parameter count) caps ZeRO's reduce bucket: DeepSpeed allocates the whole
    bucket (5e8 elements by default) at every backward, whatever the model's size: 1 GB in bf16 per GPU, 2 GB
    per CPU rank, for a model of 0.6M parameters (measured). A bucket that holds every gradient of the rank
    reduces exactly what the default one did (nothing here fills 5e8 elements), in one bucket as before."""
    accum = t.global_batch_size // (t.micro_batch_size * world)
    gen = {
        "train_batch_size": t.micro_batch_size * accum * world,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": max(1, accum),
        "gradient_clipping": optim.grad_clip,
        "bf16": {"enabled": bf16},
        # bf16 parameters, but gradients reduced in fp32, as the FSDP2 engine does
        "communication_data_type": "fp32" if bf16 else None,
        "zero_optimization": {
            "stage": parallel.deepspeed.zero_stage,
            "reduce_scatter": True,  # DeepSpeed's MoE path needs it (expert grads reduced over their group)
            "contiguous_gradients": True,
            "overlap_comm": False,
            "round_robin_gradients": False,
            "reduce_bucket_size": min(DEEPSPEED_BUCKET, local_params or DEEPSPEED_BUCKET),
        },
        "zero_allow_untested_optimizer": True,  # our client optimizer
        "steps_per_print": 2**31 - 1,  # our loop logs
        "wall_clock_breakdown": False,
    }
    path = parallel.deepspeed.config
    if path:
        try:
            user = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"parallel.deepspeed.config: file '{path}' does not exist") from None
        except ValueError as e:
            raise ConfigError(f"parallel.deepspeed.config: '{path}' is not valid JSON: {e}") from None
        bad = [k for k in _FORBIDDEN_KEYS if k in user]
        if bad:
            raise ConfigError(f"parallel.deepspeed.config sets {', '.join(bad)}; these come from optim.* (remove them)")
        gen = merge_dicts(gen, user)
    zero = gen.get("zero_optimization", {})
    if zero.get("stage", 0) not in (1, 2):
        raise ConfigError(
            f"ZeRO stage {zero.get('stage', 0)} from parallel.deepspeed.config is not supported; use 1 or 2"
        )
    for k in ("offload_optimizer", "offload_param"):
        if (zero.get(k) or {}).get("device", "none") != "none":
            # Our Muon all-gathers its partitions on the accelerator; offloaded (CPU) partitions are untested.
            raise ConfigError(f"zero_optimization.{k} in parallel.deepspeed.config is not supported by this engine")
    return gen


# ----------------------------------------------------------------------------- experts as DeepSpeed MoE params


def register_world_group(timeout_s: float) -> None:
    """DeepSpeed's data-parallel group is its own clone of the world (ZeRO's reduce-scatters and
    all-gathers run on it), made by a plain `new_group` with torch's 30-minute default timeout; make the
    clone ourselves with parallel.timeout_s, so a hung rank stops a DeepSpeed job as soon as an FSDP2 one.
    Made afresh for every engine: DeepSpeed caches it in its module, and a one-process run's group (kimi.runtime)
    is destroyed when the run ends, so a cached clone would belong to a group that no longer exists."""
    from datetime import timedelta

    import torch.distributed as dist
    from deepspeed.utils import groups

    groups._WORLD_GROUP = dist.new_group(list(range(dist.get_world_size())), timeout=timedelta(seconds=timeout_s))


def _expert_group_name(ep: int) -> str:
    return f"ep_size_{ep}"  # DeepSpeed's own naming for its expert / expert-data-parallel groups


def register_expert_groups(mesh, ep: int) -> str:
    """Hand DeepSpeed our EP and expert-data-parallel process groups under its group name; returns it."""
    from deepspeed.utils import groups

    from kimi.parallel import submesh

    name = _expert_group_name(ep)
    for mesh_name, pgs, ranks in (
        ("ep", groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_PARALLEL_GROUP_RANKS),
        ("efsdp", groups._EXPERT_DATA_PARALLEL_GROUP, groups._EXPERT_DATA_PARALLEL_GROUP_RANKS),
    ):
        sub = submesh(mesh, mesh_name)
        pgs[name], ranks[name] = sub.get_group(), sub.mesh.flatten().tolist()
    return name


def experts_to_local(model: nn.Module, group_name: str) -> list[nn.Parameter]:
    """Replace each MoE layer's DTensor expert parameters (from apply_expert_parallel) by plain Parameters
    holding this rank's shard, marked as DeepSpeed expert parameters of `group_name`."""
    out = []
    for moe in model.moe_layers():
        for name, p in list(moe.experts.named_parameters(recurse=False)):
            local = nn.Parameter(p.to_local().detach().clone(), requires_grad=p.requires_grad)
            local.allreduce, local.group_name = False, group_name  # deepspeed.moe.utils.is_moe_param
            setattr(moe.experts, name, local)
            out.append(local)
    return out


def plain_name(name: str) -> str:
    """A parameter name as the model itself spells it: activation checkpointing's wrapper adds
    `_checkpoint_wrapped_module.` to named_parameters (not to state_dict, whose hooks strip it). Expert
    files are keyed by plain names, so a checkpoint reads whatever either run used."""
    return name.replace(_CHECKPOINT_PREFIX, "")


def _moe_marker(num_experts: int) -> nn.Module:
    """An empty module DeepSpeed's engine takes for one of its MoE layers (its check is an isinstance)."""
    from deepspeed.moe.layer import MoE

    class MoEMarker(MoE):
        def __init__(self) -> None:
            nn.Module.__init__(self)  # no gate, no experts, no parameters: nothing to save or step
            self.num_experts = num_experts

        def set_deepspeed_parallelism(self, *args, **kwargs) -> None:
            pass  # the groups are ours, registered by register_expert_groups

    return MoEMarker()


def split_expert_groups(groups: list[dict]) -> list[dict]:
    """Our param groups with expert parameters moved to DeepSpeed MoE groups (deepspeed's own splitter);
    empty groups dropped."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    plain = [{k: v for k, v in g.items() if k != "param_names"} for g in groups]
    return [g for g in split_params_into_different_moe_groups_for_optimizer(plain) if g["params"]]


# ----------------------------------------------------------------------------- the engine


def _quiet_deepspeed() -> None:
    """DeepSpeed logs every step of its setup at INFO; on CPU its comm backend would also JIT-compile a
    shared-memory all-reduce op with g++ (~60 s, once per machine) that gloo does not need."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    if get_accelerator().device_name() == "cpu":
        # deepspeed.ops caches this probe in the module, "so edits to it persist" (its own comment).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class DeepSpeedEngine(Engine):
    name = "deepspeed"
    needs_process_group = True  # DeepSpeed wants one even in a single process (the runtime makes it)

    def __init__(self, model: nn.Module, rt, optim: OptimConfig, parallel: ParallelConfig, train: TrainConfig):
        import deepspeed

        from kimi.optim import ScheduleState, build_optimizer, build_scheduler
        from kimi.parallel import ParallelDims, apply_expert_parallel, submesh
        from kimi.parallel.parallelize import apply_activation_checkpointing, apply_compile, apply_fused_elementwise

        num_experts = model.config.moe.num_experts if model.moe_layers() else None
        dims = ParallelDims.for_model(parallel, model.config, rt.world)
        if dims.dp_replicate > 1:
            raise ConfigError(
                "parallel.dp_replicate > 1 (HSDP) is an FSDP2 layout; the deepspeed engine shards over all ranks"
            )
        _quiet_deepspeed()
        self.raw_model, self.rt = model, rt
        self.ep = dims.ep if model.moe_layers() else 1
        self.experts: list[nn.Parameter] = []
        register_world_group(parallel.timeout_s)
        if self.ep > 1:
            apply_expert_parallel(model, submesh(rt.mesh, "ep"), profile=train.profile)
            group_name = register_expert_groups(rt.mesh, self.ep)
            self.experts = experts_to_local(model, group_name)
        if train.activation_checkpointing:
            apply_activation_checkpointing(model)
        if train.compile:
            apply_compile(model)
        elif train.fused_elementwise:
            apply_fused_elementwise(model)

        client = build_optimizer(model, optim)
        if self.experts:
            kw = {k: v for k, v in client.defaults.items() if k != "use_muon"}
            ns = dict(
                ns_dtype=client.ns_dtype, ns_method=client.ns.method, ns_steps=client.ns.steps, ns_gram=client.ns.gram
            )
            client = type(client)(split_expert_groups(client.param_groups), **ns, **kw)
        local = sum(p.numel() for p in model.parameters())  # this rank's: dense whole, its experts
        self.ds_config = ds_config(optim, parallel, train, rt.world, rt.amp_dtype == torch.bfloat16, local)
        if self.experts:
            model.add_module("_deepspeed_moe_marker", _moe_marker(num_experts))
        try:
            self.ds, *_ = deepspeed.initialize(
                model=model, optimizer=client, config=self.ds_config, dist_init_required=False
            )
        finally:
            if self.experts:
                del model._deepspeed_moe_marker
        # The marker's work is done (ZeRO built its MoE groups); DeepSpeed's MoE checkpoint layout, which
        # expects its own expert modules, must not be used: ours is below.
        self.ds.has_moe_layers = False
        self.model = self.ds
        self._optimizer = client  # ZeRO steps it with the partitions; its param_groups carry the lr
        self._scheduler = build_scheduler(client, optim, train.max_steps)
        self.schedule_state = ScheduleState(client, self._scheduler)
        self._pre_step_hooks: list[Callable[[], None]] = []
        self._attach_flat_shards()

    def _attach_flat_shards(self) -> None:
        """Record where each parameter sits in ZeRO's flat buffers, and tell Muon where its matrices sit in
        each partition (kimi/optim/zero_muon.py)."""
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        from kimi.optim.muon import muon_lr_scale
        from kimi.optim.zero_muon import FlatShard

        zero = self.ds.optimizer
        if not isinstance(zero, DeepSpeedZeroOptimizer):  # e.g. BF16_Optimizer: bf16 ZeRO-1 + fp32 grad accumulation
            raise ConfigError(
                f"DeepSpeed chose {type(zero).__name__}, whose layout this engine does not know; drop "
                "data_types.grad_accum_dtype from parallel.deepspeed.config or use parallel.deepspeed.zero_stage=2"
            )
        self._where: dict[int, tuple[int, int]] = {}  # id(param) -> (group, offset in its flat buffer)
        for i, group in enumerate(self._optimizer.param_groups):
            flat, params, pg = (
                zero.bit16_groups_flat[i],
                zero.round_robin_bit16_groups[i],
                zero.real_dp_process_group[i],
            )
            offsets = [(p.data_ptr() - flat.data_ptr()) // flat.element_size() for p in params]
            self._where.update({id(p): (i, o) for p, o in zip(params, offsets)})
            (part,) = group["params"]
            if (
                part is not zero.single_partition_of_fp32_groups[i]
                or part.numel() * dist.get_world_size(pg) != flat.numel()
            ):
                raise RuntimeError("deepspeed engine: ZeRO's partition layout is not the one this code knows")
            if group["use_muon"]:
                part.flat_shard = FlatShard([p.shape for p in params], offsets, [muon_lr_scale(p.shape) for p in params],
                                            flat.numel(), dist.get_rank(pg), dist.get_world_size(pg), pg)  # fmt: skip

    def scale_rows_(self, p: Tensor, scale: Tensor) -> None:
        """QK-clip under ZeRO: scale the rows of the model's copy and of this rank's slice of the fp32 master
        weights, which ZeRO would otherwise copy back over the clipped model weights at the next step."""
        from kimi.optim.qk_clip import scale_rows_

        scale_rows_(p, scale)
        zero, (i, off) = self.ds.optimizer, self._where[id(p)]
        master = zero.single_partition_of_fp32_groups[i]
        start = dist.get_rank(zero.real_dp_process_group[i]) * master.numel()
        a, b = max(start, off), min(start + master.numel(), off + p.numel())
        if a < b:
            per_element = scale.to(master).repeat_interleave(p.numel() // p.shape[0])
            master[a - start : b - start].mul_(per_element[a - off : b - off])

    # ------------------------------------------------------------------ the step

    def backward(self, loss: Tensor, micro: int, num_micro: int) -> None:
        self.ds.set_gradient_accumulation_boundary(micro == num_micro - 1)  # ZeRO reduces on the last one
        self.ds.backward(loss / num_micro, scale_wrt_gas=False)

    def grad_norm(self) -> Tensor:
        # ZeRO clips inside its step(), from the norm it computes there; the trainer needs the norm before it
        # decides to apply the step, so it is computed here once more, the same way (one more all-reduce of
        # a scalar per group). Non-finite gradients give inf (DeepSpeed's combine_grad_norm_groups).
        return self.ds.optimizer.scaled_global_norm()

    def register_step_pre_hook(self, hook: Callable[[], None]) -> None:
        # Not on the client optimizer: ZeRO steps it once per param group (each group swapped in alone,
        # stage_1_and_2._optimizer_step), which would run the hook 3 times per update (Muon, AdamW with and
        # without decay; more with expert groups). step() runs them once; skip() never does.
        self._pre_step_hooks.append(hook)

    def step(self) -> None:
        for hook in self._pre_step_hooks:
            hook()
        self.ds.step()  # ZeRO: global norm, clip, client optimizer on the partitions, all-gather params, zero grads
        self._scheduler.step()

    def skip(self) -> None:
        # DeepSpeed's own overflow path (the one fp16 loss scaling uses): report an overflow for this step,
        # and ZeRO's step() clears the reduced gradients and buffers without touching the partitions, the
        # client optimizer or the weights; the engine counts it as a skipped step.
        zero = self.ds.optimizer
        check = zero.check_grad_overflow
        zero.check_grad_overflow, zero.check_overflow = True, lambda partition_gradients=True: _overflow(zero)
        try:
            self.ds.step()
        finally:
            zero.check_grad_overflow = check
            del zero.check_overflow  # the class's method again
        self._scheduler.step()

    # ------------------------------------------------------------------ checkpoints

    def _expert_ranks(self) -> tuple[int, int]:
        """(ep rank, rank among the replicas of our experts)."""
        from deepspeed.utils import groups

        name = _expert_group_name(self.ep)
        return groups._get_expert_parallel_rank(name), groups._get_expert_data_parallel_rank(name)

    def checkpoint_meta(self) -> dict[str, Any]:
        import deepspeed

        return {"engine": self.name, "zero_stage": self.ds.zero_optimization_stage(), "ep": self.ep,
                "deepspeed": deepspeed.__version__}  # fmt: skip

    def write(self, tmp: Path) -> None:
        """DeepSpeed's files (module from data-parallel rank 0, each rank's ZeRO partition of the optimizer)
        plus the experts of each EP rank, which DeepSpeed's module file holds only for EP rank 0."""
        self.ds.save_checkpoint(str(tmp.parent), tag=tmp.name, save_latest=False)  # its `latest` is a file
        if self.experts:
            ep_rank, replica = self._expert_ranks()
            if replica == 0:
                names = {id(p): plain_name(n) for n, p in self.raw_model.named_parameters()}
                state = {names[id(p)]: p.detach().cpu() for p in self.experts}
                torch.save(state, tmp / f"experts_ep{ep_rank:03d}.pt")

    def read(self, path: Path) -> None:
        meta = read_meta(path)
        if (meta.get("world_size"), meta.get("ep")) != (self.rt.world, self.ep):
            raise CheckpointError(
                f"checkpoint '{path}' was written at world size {meta.get('world_size')}, ep {meta.get('ep')}; "
                f"the deepspeed engine resumes only the same layout (this run: {self.rt.world}, ep {self.ep})"
            )

        def load_module(src: dict, dst: nn.Module) -> None:
            dst.load_state_dict(src)  # rank 0's experts: ours come next
            if self.experts:
                experts = torch.load(path / f"experts_ep{self._expert_ranks()[0]:03d}.pt", weights_only=True)
                params = {plain_name(n): p for n, p in self.raw_model.named_parameters()}
                with torch.no_grad():
                    for n, t in experts.items():  # plain_name: files written before expert names were plain
                        params[plain_name(n)].copy_(t)

        loaded, _ = self.ds.load_checkpoint(
            str(path.parent), tag=path.name, load_lr_scheduler_states=False, custom_load_fn=load_module
        )
        if loaded is None:
            raise CheckpointError(f"deepspeed could not load the checkpoint in '{path}'")
        # ZeRO's load_state_dict also restores the clipping value it saved; this run's config holds on
        # resume (optim.grad_clip, as under FSDP2 and as the trainer's "config differs" line says).
        self.ds.optimizer.clip_grad = self.ds.gradient_clipping()


def _overflow(zero) -> None:
    zero.overflow = True


ENGINE = DeepSpeedEngine


def read_model_state(path: Path, cfg_dict: dict[str, Any] | None = None) -> dict[str, Tensor]:
    """The full model state dict of a DeepSpeed checkpoint directory, on one process, without DeepSpeed:
    its module file (written from rank 0, holding EP rank 0's experts), with each expert weight rebuilt
    from the experts_epNNN.pt files along the expert dimension. For generate, evaluate and convert."""
    module_file = path / "mp_rank_00_model_states.pt"
    if not module_file.is_file():
        raise CheckpointError(f"checkpoint '{path}' has no {module_file.name}; is it a DeepSpeed checkpoint?")
    # weights_only=False: DeepSpeed stores its config objects next to the weights. The file is ours, and
    # its checksum was verified against meta.json before this.
    sd = dict(torch.load(module_file, map_location="cpu", weights_only=False)["module"])
    shards = [torch.load(f, weights_only=True) for f in sorted(path.glob("experts_ep*.pt"))]
    for name in shards[0] if shards else ():  # plain_name: files written before expert names were plain
        sd[plain_name(name)] = torch.cat([s[name] for s in shards], dim=0)  # (E/ep, ...) per EP rank -> (E, ...)
    return sd


def memory_estimate(sizes: dict, dims, parallel) -> dict[str, float]:
    """Per-GPU bytes under ZeRO-1/2 (for --dry-run): parameters replicated in the working dtype (bf16 on GPU,
    fp32 on CPU; experts over ep), plus fp32 master weights partitioned over all ranks (experts over their
    replicas; a copy even when the working dtype is fp32). Gradients kept to the step: the rank's partition
    (ZeRO-1 and -2 alike). Optimizer state as FSDP2's. `buffers`, inside a step: ZeRO's reduce bucket (capped
    at the rank's parameter count by ds_config) in the working dtype, and under ZeRO-1 also the rank's full
    gradients, which it reduces only after backward (ZeRO-2 reduces them bucket by bucket). Measured on gloo
    CPU ranks (docs/training.md): within 11% at world 1 to 8."""
    total, experts, muon = sizes["total"], sizes["expert_params"], sizes["muon"]
    local = total - experts + experts / max(1, dims.ep)  # this rank's parameters: dense whole, its experts
    partition = total / dims.world_size  # dense over all ranks, experts over their world/ep replicas
    work = sizes["working_bytes"]
    full_grads = local * work if parallel.deepspeed.zero_stage == 1 else 0
    return {
        "params": local * work + partition * 4,  # the module's copy + the fp32 master partition
        "grads": partition * work,
        "optim": (muon * 4 + (total - muon) * 8) / dims.dp_shard,
        "buffers": min(DEEPSPEED_BUCKET, local) * work + full_grads,
        "activations": sizes["activations"],
    }
