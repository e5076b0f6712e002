"""Muon for hidden matrices and AdamW for everything else, in one optimizer.

Muon (Keller Jordan) keeps a Nesterov momentum of each weight matrix's gradient and replaces it by the
nearest semi-orthogonal matrix (Newton-Schulz) before stepping. Following Moonlight ("Muon is Scalable
for LLM Training") the orthogonalised update of an A x B matrix is scaled by 0.2 * sqrt(max(A, B)) so its
RMS matches a typical AdamW update, which lets Muon reuse AdamW's learning rate and weight decay.

Muon should only be used for hidden weight matrices. Embeddings, the output head, the MoE router and
every parameter with fewer than two dimensions (norms, biases) go to AdamW; `build_optimizer` does the
split. Parameters of more than two dimensions (MoE experts, (E, F, D)) are stacks of matrices: each
(A, B) slice over the last two dims is orthogonalised on its own, all in one batched call.

The same class runs on one device and under FSDP2: when a parameter is a DTensor sharded along a matrix
dimension, `dist_muon.orthogonalize` gathers whole matrices onto owner ranks for Newton-Schulz. With
plain tensors it does no communication.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from kimi.config import ConfigError, OptimConfig
from kimi.optim.dist_muon import orthogonalize  # the (possibly distributed) Newton-Schulz
from kimi.optim.newton_schulz import (  # noqa: F401  (newton_schulz re-exported)
    NSSpec,
    default_ns_dtype,
    newton_schulz,
    newton_schulz_flops,
    resolve_gram,
)


def muon_lr_scale(shape: torch.Size) -> float:
    """Moonlight's RMS matching: an orthogonal A x B update has RMS ~1/sqrt(max(A, B)); AdamW's is ~0.2."""
    return 0.2 * math.sqrt(max(shape[-2], shape[-1]))


# Muon parameters per Newton-Schulz chunk, by global element count (8M: 32 MB of fp32 updates).
CHUNK_NUMEL = 1 << 23


def update_chunks(params: list[Tensor], limit: int) -> list[list[Tensor]]:
    """`params` ordered by (shape, position) and cut into runs of at most `limit` elements (a larger
    parameter is a chunk of its own). Depends only on global shapes, so every rank cuts alike, which the
    distributed Newton-Schulz (one collective per chunk) needs."""
    flat = [[p] for p in params if hasattr(p, "flat_shard")]  # ZeRO partitions: alone, in their own order
    rest = [p for p in params if not hasattr(p, "flat_shard")]
    order = sorted(range(len(rest)), key=lambda i: (tuple(rest[i].shape), i))
    chunks: list[list[Tensor]] = flat
    size = limit
    for i in order:
        n = rest[i].numel()  # a DTensor's numel is its global count
        if size + n > limit:
            chunks.append([])
            size = 0
        chunks[-1].append(rest[i])
        size += n
    return chunks


def _local(t: Tensor) -> Tensor:
    """The rank-local data of a DTensor (a view: in-place ops write through), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


class Muon(torch.optim.Optimizer):
    """Muon + AdamW. Each param group carries `use_muon`; Muon groups use lr, weight_decay, momentum,
    nesterov; AdamW groups use lr, weight_decay, betas, eps. Weight decay is decoupled in both
    (p *= 1 - lr * wd, with the group's unscaled lr). Gradients must already be reduced across ranks
    (FSDP2 does that); a parameter whose grad is None is skipped, which must happen on all ranks alike.

    `ns_method`, `ns_steps`, `ns_gram`: which Newton-Schulz (newton_schulz.NSSpec; ns_steps None: the
    method's default; ns_gram "auto": Gram iterations wherever Newton-Schulz runs in fp32). Like `ns_dtype`
    they belong to the optimizer, not to its param groups, so a resumed run uses its config's, not its
    checkpoint's.
    `ns_dtype`: Newton-Schulz compute (and, when distributed, communication) dtype; None: bf16 on CUDA and
    on CPUs with native bf16 matmuls, fp32 elsewhere, fp32 for ns_gram=True (newton_schulz.default_ns_dtype).
    `chunk_numel`: Muon parameters are updated in chunks of about this many elements (`update_chunks`),
    which bounds the step's temporary memory.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 3e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int | None = None,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        ns_dtype: torch.dtype | None = None,
        chunk_numel: int = CHUNK_NUMEL,
        ns_method: str = "quintic",
        ns_gram: bool | str = "auto",
    ):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1:
            raise ValueError(
                f"Muon: need lr >= 0, weight_decay >= 0, 0 <= momentum < 1 (got {lr}, {weight_decay}, {momentum})"
            )
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        betas=tuple(betas), eps=eps, use_muon=True)  # fmt: skip
        super().__init__(params, defaults)
        self.ns = NSSpec(ns_method, ns_steps, ns_gram)
        self.ns_dtype = ns_dtype
        self.chunk_numel = chunk_numel
        for group in self.param_groups:
            for p in group["params"]:
                if group["use_muon"] and p.ndim < 2:
                    raise ValueError(
                        f"Muon group got a {p.ndim}-D parameter of shape {tuple(p.shape)}; put it in an AdamW group"
                    )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def newton_schulz_flops(self, device: torch.device) -> int:
        """Matmul FLOPs of one step's Newton-Schulz over all Muon matrices (global shapes: the whole job's,
        whichever rank runs each), as it runs on `device` (which picks the dtype, and so "auto" Gram)."""
        gram = resolve_gram(self.ns.gram, self.ns_dtype or default_ns_dtype(device, self.ns.gram))
        muon = [p for g in self.param_groups if g["use_muon"] for p in g["params"]]
        return sum(newton_schulz_flops(tuple(p.shape), self.ns.steps, gram) for p in muon)

    def _muon_step(self, group: dict) -> None:
        lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
        params = [p for p in group["params"] if p.grad is not None]
        # In chunks of similar shapes, so the Nesterov copies, stacks and Newton-Schulz temporaries of one
        # chunk are alive at a time (peak memory), while same-shape matrices still share batched calls.
        for chunk in update_chunks(params, self.chunk_numel):
            updates = []
            for p in chunk:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)  # a DTensor when p is: checkpoints reshard
                g, buf = _local(p.grad), _local(state["momentum_buffer"])
                # EMA momentum (torch.optim.Muon's form); Moonlight's buf = m*buf + g differs by a constant
                # factor (1 - m) that Newton-Schulz's normalisation removes.
                buf.lerp_(g, 1 - mom)
                updates.append(g.lerp(buf, mom) if group["nesterov"] else buf)
            orthos = orthogonalize(chunk, updates, self.ns, dtype=self.ns_dtype)
            del updates
            for p, o in zip(chunk, orthos):
                p_local = _local(p)
                p_local.mul_(1 - lr * wd)
                scale = 1.0 if hasattr(p, "flat_shard") else muon_lr_scale(p.shape)  # p.shape: global shape
                p_local.add_(o.to(p_local.dtype), alpha=-lr * scale)

    def _adamw_step(self, group: dict) -> None:
        """One AdamW step of the group in torch's fused kernel (torch.optim.AdamW(fused=True)'s): one pass
        over each tensor's p, g, m, v instead of ~10 elementwise ops with temporaries. On one quiet CPU thread
        that is 46 vs 173-176 ms for two 50,257 x 384 matrices (nano's embedding and head). The update is
        AdamW's: p *= 1 - lr*wd; m, v EMAs; p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)."""
        lr, wd, (beta1, beta2), eps = group["lr"], group["weight_decay"], group["betas"], group["eps"]
        lists: dict[tuple, tuple[list, ...]] = {}  # (device, dtype) -> params, grads, m, v, steps
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            p_local = _local(p)
            if state["step"].device != p_local.device:  # the kernel reads the count on the params' device
                state["step"] = state["step"].to(p_local.device)
            row = (p_local, _local(p.grad), _local(state["exp_avg"]), _local(state["exp_avg_sq"]), state["step"])
            for column, t in zip(lists.setdefault((p_local.device, p_local.dtype), ([], [], [], [], [])), row):
                column.append(t)
        for params, grads, exp_avgs, exp_avg_sqs, steps in lists.values():
            torch._foreach_add_(steps, 1)
            torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=beta1, beta2=beta2,
                                weight_decay=wd, eps=eps, amsgrad=False, maximize=False)  # fmt: skip


# ----------------------------------------------------------------------------- building from a model

ADAMW_NAME_KEYS = ("embed_tokens", "embed_positions", "lm_head", "router")  # >= 2-D, yet not hidden matrices: AdamW
ROUTED_EXPERTS = ".ffn.experts."  # the stacked routed-expert weights (not the shared experts)


def param_group_name(name: str, p: Tensor, cfg: OptimConfig) -> str:
    """'muon', 'adamw' (decayed) or 'adamw_no_decay' (ndim < 2: norms and biases are not decayed). The routed
    experts go to AdamW with cfg.expert_optimizer == 'adamw'."""
    if p.ndim < 2:
        return "adamw_no_decay"
    if cfg.name == "adamw" or any(k in name for k in ADAMW_NAME_KEYS):
        return "adamw"
    if cfg.expert_optimizer == "adamw" and ROUTED_EXPERTS in name:
        return "adamw"
    return "muon"


def build_optimizer(model: nn.Module, cfg: OptimConfig, ns_dtype: torch.dtype | None = None) -> Muon:
    """Split `model`'s trainable parameters into Muon / AdamW groups (each group has a 'name') and build
    one `Muon` optimizer. cfg.name == 'adamw' puts every parameter in AdamW groups. With
    cfg.expert_lr_mult != 1 the routed experts get groups of their own ('muon_experts' / 'adamw_experts')
    whose lr is lr x expert_lr_mult (the schedule scales each group's own lr).

    `ns_dtype` (a torch dtype) overrides cfg.ns_dtype; cfg's "auto" leaves the choice to the device.
    Raises ConfigError naming any trainable parameter that lands in no group or in more than one.
    """
    cfg.validate()
    if ns_dtype is None and cfg.ns_dtype != "auto":
        ns_dtype = torch.bfloat16 if cfg.ns_dtype == "bf16" else torch.float32
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    by_group: dict[str, list[tuple[str, Tensor]]] = {"muon": [], "adamw": [], "adamw_no_decay": []}
    for n, p in named:
        by_group[param_group_name(n, p, cfg)].append((n, p))
    if cfg.expert_lr_mult != 1.0:  # the routed experts in groups of their own, at their own lr
        for gname in ("muon", "adamw"):
            by_group[gname + "_experts"] = [(n, p) for n, p in by_group[gname] if ROUTED_EXPERTS in n]
            by_group[gname] = [(n, p) for n, p in by_group[gname] if ROUTED_EXPERTS not in n]
    groups = []
    for gname, items in by_group.items():
        if not items:
            continue
        # (name, p) pairs: torch keeps "param_names"
        g = dict(name=gname, params=list(items), use_muon=gname.startswith("muon"))
        if gname == "adamw_no_decay":
            g["weight_decay"] = 0.0
        if gname.endswith("_experts"):
            g["lr"] = cfg.lr * cfg.expert_lr_mult
        groups.append(g)
    _check_partition(named, groups)
    return Muon(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, nesterov=cfg.nesterov,
                betas=cfg.betas, eps=cfg.eps, ns_dtype=ns_dtype, ns_method=cfg.ns_method, ns_steps=cfg.ns_steps,
                ns_gram=cfg.ns_gram)  # fmt: skip


def _check_partition(named: list[tuple[str, Tensor]], groups: list[dict]) -> None:
    """Every trainable parameter in exactly one group (a guard for future edits of the split rule)."""
    count: dict[int, int] = {}
    for g in groups:
        for item in g["params"]:
            p = item[1] if isinstance(item, tuple) else item  # (name, param) pairs or bare params
            count[id(p)] = count.get(id(p), 0) + 1
    bad = [f"{n} (in {count.get(id(p), 0)} groups)" for n, p in named if count.get(id(p), 0) != 1]
    if bad:
        raise ConfigError(f"optimizer param groups must hold every trainable parameter exactly once: {', '.join(bad)}")
