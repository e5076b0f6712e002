"""Validation loss and perplexity of a checkpoint on a prepared dataset.

python -m kimi.evaluate --checkpoint out/nano --data data/shakespeare [--split val] [--batches 20]
"""

from __future__ import annotations

import argparse
import sys

import torch


class ModelEvaluator:
    """`ModelEvaluator().evaluate_perplexity(model, dataset)` -> {"loss", "perplexity", "tokens"}."""

    def __init__(self, batch_size: int = 8, num_batches: int = 20):
        for name, v in (("batch_size", batch_size), ("num_batches", num_batches)):
            if v < 1:  # 0 batches would report loss 0 / perplexity 1, a perfect score from no data
                raise ValueError(f"{name}={v} must be >= 1")
        self.batch_size = batch_size
        self.num_batches = num_batches

    def evaluate_perplexity(self, model: torch.nn.Module, dataset) -> dict[str, float]:
        """Loss over `num_batches` fixed, evenly spaced batches of `dataset` (kimi.trainer.validator.evaluate)."""
        from kimi.trainer.validator import evaluate

        if dataset.vocab_size > model.config.vocab_size:
            raise ValueError(
                f"the dataset's vocabulary ({dataset.vocab_size}) is larger than the model's "
                f"({model.config.vocab_size}); evaluate with data prepared for this model"
            )
        device = next(model.parameters()).device
        return evaluate(model, dataset.eval_batches(self.num_batches, self.batch_size), device)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m kimi.evaluate",
        description="Loss and perplexity of a checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="a step dir, OUT/checkpoints/latest, or a run's OUT dir")
    p.add_argument("--data", required=True, help="a directory written by python -m kimi.prepare")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--batches", type=int, default=20, help="fixed, evenly spaced batches to score")
    p.add_argument("--batch-size", type=int, default=8, help="windows per batch")
    args = p.parse_args(argv)
    try:
        for flag, v in (("--batches", args.batches), ("--batch-size", args.batch_size)):
            if v < 1:
                raise ValueError(f"{flag}={v} must be >= 1")
        from kimi.config import DataConfig
        from kimi.data.dataset import build_dataset
        from kimi.loading import load_model

        model = load_model(args.checkpoint)
        if torch.cuda.is_available():
            model.cuda()
        cfg = model.config
        ds = build_dataset(DataConfig(dataset=args.data), cfg.block_size, cfg.vocab_size, seed=0, split=args.split)
        res = ModelEvaluator(args.batch_size, args.batches).evaluate_perplexity(model, ds)
        print(f"{args.split} loss {res['loss']:.4f} | perplexity {res['perplexity']:.2f} | {res['tokens']:,} tokens")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
