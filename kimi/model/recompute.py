"""Selective recompute inside the model: regions whose cheap, large activations are rebuilt in backward.

train.activation_checkpointing (kimi/parallel/parallelize.py) recomputes whole blocks, matmuls included.
The regions here are narrower: `recompute(fn, *args, keep=...)` keeps the outputs of the named ops (the
expensive ones: matmuls, fused attention) and recomputes everything else `fn` saved for backward
(gathers, elementwise products, concatenations). The model chooses the regions, since only it knows
where a cheap op produces a large tensor; the config turns each on (moe.recompute,
attention.recompute_kv). Both kinds nest: a block checkpointed as a whole may contain these regions.

Recomputation replays deterministic ops on the same inputs, so values and gradients are bit-identical to
a plain forward. Side effects must not run twice: code that counts or records during a forward checks
`recomputing()`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

aten = torch.ops.aten

# Matmul outputs: what a region keeps when its matmuls are the expensive part.
MATMULS = frozenset({aten.mm.default, aten.addmm.default, aten.bmm.default, aten._grouped_mm.default})

# Fused attention kernels (GPU flash / memory-efficient / cuDNN, and CPU flash) return the output and the
# softmax statistics their backward needs. SDPA's math fallback is not one op but a decomposition
# (bmm, softmax, ...) that this set does not name, so a region that takes it recomputes attention too.
ATTENTION = frozenset(
    getattr(aten, name).default
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    )
    if hasattr(aten, name)
)


def recomputing() -> bool:
    """True while autograd recomputes a checkpointed forward (a region here, or a whole block); routing
    counts and max-logit records must not be taken twice."""
    return torch._C._current_graph_task_id() != -1


def _policy(keep: frozenset, ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE


def recompute(fn: Callable, *args, keep: frozenset) -> torch.Tensor:
    """fn(*args), keeping for backward only fn's inputs and the outputs of the ops in `keep`; whatever else
    fn saves is recomputed from them in backward (non-reentrant torch.utils.checkpoint with a selective
    policy). fn must be deterministic. It runs again in backward, so parameters a module swaps in only
    for its forward (the experts' local views under expert parallelism) must come in through `args`.
    A plain call when autograd is off."""
    if not torch.is_grad_enabled():
        return fn(*args)
    context_fn = functools.partial(create_selective_checkpoint_contexts, functools.partial(_policy, keep))
    return checkpoint(fn, *args, use_reentrant=False, context_fn=context_fn)
