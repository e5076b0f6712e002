"""Loss by position in the window: does a model use long context? (issue 19, "long-range modelling").

A model that uses what it read earlier in the window gets better as the position grows; the gap between
two attention types in the late buckets (1k-2k) is what "better long-range modelling" has to show.
Scored on the whole validation split in non-overlapping windows, as `kimi.bench compare` scores its
final loss, so every token counts once and every bucket sees the same text.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bucket_edges(block_size: int) -> list[int]:
    """0-256, 256-1k, 1k-2k (issue 19's buckets), cut at the window: [0, 256, 1024, 2048] for 2,048."""
    return [0] + [e for e in (256, 1024, 2048, 4096, 8192) if e < block_size] + [block_size]


@torch.no_grad()
def loss_by_position(model: torch.nn.Module, dataset, edges: list[int], batch_size: int = 8,
                     max_windows: int | None = None) -> dict[str, float]:  # fmt: skip
    """{"a-b": mean cross entropy of the targets at window positions [a, b)} over the split's windows."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_T = None
    count = 0
    for x_BT, y_BT in dataset.split_batches(batch_size, max_windows):
        logits_BTV = model(x_BT.to(device)).logits
        nll_BT = F.cross_entropy(logits_BTV.float().flatten(0, 1), y_BT.to(device).flatten(), reduction="none")
        nll_T = nll_BT.view(y_BT.shape).double().sum(0)
        total_T = nll_T if total_T is None else total_T + nll_T
        count += y_BT.shape[0]
    model.train(was_training)
    if total_T is None:
        raise ValueError("loss_by_position: the split holds no full window")
    mean_T = total_T / count
    return {f"{a}-{b}": mean_T[a:b].mean().item() for a, b in zip(edges, edges[1:])}
