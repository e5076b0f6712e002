"""The seed README's Python API for a comparison in one process:

    from kimi.bench import NanoGPTComparison
    res = NanoGPTComparison(steps=200).compare_models(kimi_model, gpt_model, dataset, val_dataset)
    res["kimi"]["val_loss"], res["gpt"]["val_loss"], res["speedup_tokens"]

Both models are trained from their current weights by the real trainer (kimi.train: the engine, the
router-bias hook, QK-clip, the same step `python -m kimi.train` runs) on the same windows of `dataset`
(window j of step s is a function of (seed, s, j)), each with its own optimizer recipe (nanoKimi: Muon +
QK-clip; GPT: AdamW as nanoGPT). The curve is the trainer's validation on fixed, evenly spaced windows of
`val_dataset` (default: `dataset`); the final loss scores the whole of `val_dataset` in non-overlapping
windows. `python -m kimi.bench compare` is the full harness (separate processes, lr sweep, seeds,
ablations, tables, plots, MLflow); this is its in-process core.
"""

from __future__ import annotations

import shutil
import tempfile

from kimi.bench.compare import full_split_loss, tokens_to_reach
from kimi.config import Config, DataConfig, LoggingConfig, OptimConfig, TrainConfig


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
        from kimi.train import Hooks, train

        device = next(model.parameters()).device
        out = tempfile.mkdtemp(prefix="kimi-compare-")
        # eval_batches x batch_size evenly spaced windows: eval_windows of them when it divides
        eval_batches = max(1, -(-self.eval_windows // self.batch_size))
        cfg = Config(
            model=model.config,
            optim=optim_cfg,
            train=TrainConfig(
                max_steps=self.steps,
                global_batch_size=self.batch_size,
                micro_batch_size=self.batch_size,
                eval_interval=self.eval_every,
                eval_batches=eval_batches,
                log_interval=self.steps,
                out_dir=out,
                resume=False,
                device=device.type,
                seed=dataset.seed,
            ),  # fmt: skip
            data=DataConfig(block_size=dataset.block_size),
            logging=LoggingConfig(mlflow=False),
        )
        curve, train_s = [], [0.0]

        def on_step(step: int, row: dict) -> None:
            train_s[0] += row["step_time_s"]
            if "val_loss" in row:
                curve.append((step * self.batch_size * dataset.block_size, row["val_loss"]))

        try:
            train(cfg, hooks=Hooks(on_step=on_step), model=model, train_set=dataset, val_set=val_dataset)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        final = full_split_loss(model, val_dataset)
        return {"params_total": model.num_params(), "params_active_non_embedding":
                model.num_active_params(non_embedding=True), "curve": curve, "train_time_s": train_s[0],
                "val_loss": final["loss"], "val_perplexity": final["perplexity"]}  # fmt: skip

    def compare_models(self, kimi_model, gpt_model, dataset, val_dataset=None) -> dict:
        val_dataset = val_dataset or dataset
        gpt = self.train(gpt_model, self.gpt_optim, dataset, val_dataset)
        kimi = self.train(kimi_model, self.kimi_optim, dataset, val_dataset)
        target = gpt["curve"][-1][1]
        t_gpt, t_kimi = tokens_to_reach(gpt["curve"], target), tokens_to_reach(kimi["curve"], target)
        return {"kimi": kimi, "gpt": gpt, "target_loss": target, "kimi_tokens_to_gpt_loss": t_kimi,
                "speedup_tokens": t_gpt / t_kimi if t_gpt and t_kimi else None}  # fmt: skip


__all__ = ["NanoGPTComparison"]
