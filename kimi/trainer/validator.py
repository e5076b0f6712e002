"""Validation: one evaluate() and one perplexity rule for the trainer, `python -m kimi.evaluate` and
`kimi.bench` alike.

evaluate() takes batches (x, y); which windows they are is the caller's choice: the trainer's fixed
evenly spaced windows (`TokenDataset.eval_batches`, the same every eval, so curves are comparable) or a
whole split in non-overlapping windows (`TokenDataset.split_batches`, every token scored once).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import nullcontext

import torch

PPL_CAP = 50.0  # perplexity is reported as exp(min(loss, 50)): an untrained model never overflows a metric store


def perplexity(loss: float) -> float:
    return math.exp(min(loss, PPL_CAP))


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
             autocast: Callable = nullcontext, mean_over_ranks: Callable | None = None) -> dict[str, float]:  # fmt: skip
    """Token-weighted mean cross entropy of `model` over `batches`, in eval mode (restored after):
    {"loss", "perplexity", "tokens"}. `mean_over_ranks` (a collective) averages the loss over ranks that
    each evaluated an equal share."""
    was_training = model.training
    model.eval()
    total, tokens = torch.zeros((), dtype=torch.float64, device=device), 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast():
            total += model(x, y).ce_loss.double() * y.numel()
        tokens += y.numel()
    model.train(was_training)
    loss_t = total / max(1, tokens)
    loss = (mean_over_ranks(loss_t) if mean_over_ranks else loss_t).item()
    return {"loss": loss, "perplexity": perplexity(loss), "tokens": tokens}


class Validator:
    """The trainer's validation: every `eval_interval` steps and at the last step, each rank scores its
    slice of `eval_batches` fixed global batches, in micro-batches."""

    def __init__(self, val_set, train_cfg, rt) -> None:
        self.val_set, self.cfg, self.rt = val_set, train_cfg, rt
        self.best = math.inf

    def due(self, step: int) -> bool:
        t = self.cfg
        return self.val_set is not None and t.eval_interval > 0 and (step % t.eval_interval == 0 or step == t.max_steps)

    def _my_batches(self, val_set):
        t, rt = self.cfg, self.rt
        per_rank = max(1, t.global_batch_size // rt.world)
        for x, y in val_set.eval_batches(t.eval_batches, per_rank * rt.world):
            x, y = x[rt.rank * per_rank : (rt.rank + 1) * per_rank], y[rt.rank * per_rank : (rt.rank + 1) * per_rank]
            for i in range(0, per_rank, t.micro_batch_size):
                yield x[i : i + t.micro_batch_size], y[i : i + t.micro_batch_size]

    def run(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        """{"val_loss", "val_ppl"} on due steps, else {}. Collective."""
        if not self.due(step):
            return {}
        rt = self.rt
        if hasattr(self.val_set, "sources"):
            return self._run_mixture(model)
        res = evaluate(model, self._my_batches(self.val_set), rt.device, rt.autocast, rt.all_reduce_mean)
        self.best = min(self.best, res["loss"])
        return {"val_loss": res["loss"], "val_ppl": res["perplexity"]}

    def _run_mixture(self, model: torch.nn.Module) -> dict[str, float]:
        """A data.mix: `val_loss/<name>` on each source's own val split (eval_batches each), and `val_loss` their
        mean weighted as training draws them: the loss on the training mixture."""
        rt, mix, row, total = self.rt, self.val_set, {}, 0.0
        shares = [w / sum(mix.weights) for w in mix.weights]
        for name, src, share in zip(mix.names, mix.sources, shares):
            loss = evaluate(model, self._my_batches(src), rt.device, rt.autocast, rt.all_reduce_mean)["loss"]
            row[f"val_loss/{name}"], total = loss, total + share * loss
        self.best = min(self.best, total)
        return {"val_loss": total, "val_ppl": perplexity(total), **row}
