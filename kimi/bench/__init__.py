"""Benchmarks: `python -m kimi.bench dist|train|kernels|compare|throughput|memory` (see run.py), and the
seed README's API: `NanoGPTComparison().compare_models(kimi_model, gpt_model, dataset)`."""

from kimi.bench.api import NanoGPTComparison

__all__ = ["NanoGPTComparison"]
