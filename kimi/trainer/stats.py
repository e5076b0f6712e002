"""What a training step reads off the model besides the loss: routing, attention maxima, all-to-all traffic.

The router-bias update (aux-loss-free balancing) runs in ONE place: `RouterBias`, registered as a
pre-step hook by the trainer (engine.register_step_pre_hook), so it runs once per applied update and
never on a skipped step, whatever the engine (torchtitan does the same; its PR #1324
fixed an accumulation bug that a separate call had caused).
"""

from __future__ import annotations

import torch
from torch import nn


class RouterBias:
    """Pre-step hook: all-reduce this step's per-expert counts (kimi.parallel.update_router_bias: one
    collective for all layers), update every MoE layer's bias; `row()` then gives the step's load stats."""

    def __init__(self, model: nn.Module, group) -> None:
        self.model, self.group = model, group
        self.counts_LE: list[torch.Tensor] | None = None  # this step's global counts, until row() reads them
        self.loads_LE: list[torch.Tensor] | None = None  # the last applied step's (for the expert-load table)

    def __call__(self) -> None:
        from kimi.parallel import update_router_bias

        self.counts_LE = update_router_bias(self.model, self.group) if self.model.moe_layers() else None

    def row(self) -> dict:
        """{"expert_imbalance", "router_entropy"} of the step just applied ({} without MoE layers or update)."""
        counts, self.counts_LE = self.counts_LE, None
        if not counts:
            return {}
        stats = [moe.routing_stats(c) for moe, c in zip(self.model.moe_layers(), counts)]
        self.loads_LE = counts
        return {
            "expert_imbalance": sum(s["max_load"] for s in stats) / len(stats),
            "router_entropy": sum(s["router_entropy"] for s in stats) / len(stats),
        }


def max_logit_stats(model: nn.Module, all_reduce_max) -> dict:
    """Max attention logit of this step when QK-clip is off (for logging only); resets the maxima."""
    layers = model.attention_layers()
    maxima = [m.max_logits_H for m in layers if hasattr(m, "max_logits_H")]
    if not maxima:
        return {}
    m = all_reduce_max(torch.stack(maxima).max().detach().clone())
    for layer in layers:
        layer.reset_max_logits()
    return {"max_logit": m.item(), "clipped_heads": 0}


def forget_step(model: nn.Module) -> None:
    """A skipped step forgets the attention maxima and routing counts its forward recorded, so the next
    step starts clean (weights, optimizer state and router biases are the engine's and stay as they were)."""
    for layer in model.attention_layers():
        if hasattr(layer, "reset_max_logits"):
            layer.reset_max_logits()
    for moe in model.moe_layers():
        moe.discard_counts()


def a2a_stats(model: nn.Module) -> dict:
    """Expert-parallel all-to-all traffic of this step (forward, this rank), then reset the counters."""
    stats = [m.dispatcher.stats for m in model.moe_layers() if hasattr(m.dispatcher, "stats")]
    if not stats:
        return {}
    row = {"a2a_MB": sum(s["a2a_bytes"] for s in stats) / 1e6}
    if any(s["a2a_s"] for s in stats):
        row["a2a_ms"] = 1000 * sum(s["a2a_s"] for s in stats)
    for s in stats:
        s["a2a_bytes"], s["a2a_s"] = 0, 0.0
    return row
