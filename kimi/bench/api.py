"""The seed README's Python API for a comparison in one process:

    from kimi.bench import NanoGPTComparison
    res = NanoGPTComparison(steps=200).compare_models(kimi_model, gpt_model, dataset, val_dataset)
    res["kimi"]["val_loss"], res["gpt"]["val_loss"], res["speedup_tokens"]

Both models are trained from their current weights on the same windows of `dataset` (window j of step s
is a function of (seed, s, j)), each with its own optimizer recipe (nanoKimi: Muon + QK-clip + the
aux-loss-free bias update; GPT: AdamW as nanoGPT), then scored on the whole of `val_dataset` (default:
`dataset`) in non-overlapping windows. `python -m kimi.bench compare` is the full harness (separate
processes, lr sweep, seeds, ablations, tables, plots, MLflow); this is its in-process core.
"""

from __future__ import annotations

import time

import torch

from kimi.bench.compare import full_split_loss, tokens_to_reach
from kimi.config import OptimConfig


def _nanogpt_optim() -> OptimConfig:
    return OptimConfig(name="adamw", lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, schedule="cosine",
                       warmup_steps=10, min_lr_ratio=0.1, grad_clip=1.0, qk_clip=False)  # fmt: skip


class NanoGPTComparison:
    def __init__(self, steps: int = 100, batch_size: int = 8, eval_every: int = 10, eval_windows: int = 16,
                 kimi_optim: OptimConfig | None = None, gpt_optim: OptimConfig | None = None):  # fmt: skip
        self.steps, self.batch_size, self.eval_every, self.eval_windows = steps, batch_size, eval_every, eval_windows
        self.kimi_optim = kimi_optim or OptimConfig(warmup_steps=10)
        self.gpt_optim = gpt_optim or _nanogpt_optim()

    def train(self, model, optim_cfg: OptimConfig, dataset, val_dataset) -> dict:
        """Train `model` in place for self.steps; returns its curve, time and final whole-split loss."""
        from kimi.optim import QKClip, build_optimizer, build_scheduler, clip_grad_norm_
        from kimi.parallel.routing import update_router_bias

        device = next(model.parameters()).device
        opt = build_optimizer(model, optim_cfg)
        sched = build_scheduler(opt, optim_cfg, self.steps)
        qk_clip = QKClip(model.attention_layers(), optim_cfg.qk_clip_tau) if optim_cfg.qk_clip else None
        probe = val_dataset.eval_batches(1, self.eval_windows)[0]  # the fixed windows the curve is measured on
        curve, train_s = [], 0.0
        model.train()
        for step in range(self.steps):
            t0 = time.perf_counter()
            x, y = dataset.get_batch(step, 0, self.batch_size)
            model(x.to(device), y.to(device)).loss.backward()
            clip_grad_norm_(model.parameters(), optim_cfg.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if qk_clip:
                qk_clip.step()
            update_router_bias(model)
            train_s += time.perf_counter() - t0
            if (step + 1) % self.eval_every == 0 or step + 1 == self.steps:
                with torch.no_grad():
                    model.eval()
                    loss = model(probe[0].to(device), probe[1].to(device)).ce_loss.item()
                    model.train()
                curve.append(((step + 1) * self.batch_size * dataset.block_size, loss))
        final = full_split_loss(model, val_dataset)
        return {"params_total": model.num_params(), "params_active_non_embedding":
                model.num_active_params(non_embedding=True), "curve": curve, "train_time_s": train_s,
                "val_loss": final["loss"], "val_perplexity": final["perplexity"]}  # fmt: skip

    def compare_models(self, kimi_model, gpt_model, dataset, val_dataset=None) -> dict:
        val_dataset = val_dataset or dataset
        gpt = self.train(gpt_model, self.gpt_optim, dataset, val_dataset)
        kimi = self.train(kimi_model, self.kimi_optim, dataset, val_dataset)
        target = gpt["curve"][-1][1]
        t_gpt, t_kimi = tokens_to_reach(gpt["curve"], target), tokens_to_reach(kimi["curve"], target)
        return {"kimi": kimi, "gpt": gpt, "target_loss": target, "kimi_tokens_to_gpt_loss": t_kimi,
                "speedup_tokens": t_gpt / t_kimi if t_gpt and t_kimi else None}  # fmt: skip
