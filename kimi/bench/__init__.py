"""Benchmarks: `python -m kimi.bench dist|train|kernels|compare|throughput|memory|data` (see run.py), and the
seed README's API: `NanoGPTComparison().compare_models(kimi_model, gpt_model, dataset)`."""

__all__ = ["NanoGPTComparison"]


def __getattr__(name):  # lazy: the data bench's measured children (kimi.bench.rusage) must not import torch
    if name == "NanoGPTComparison":
        from kimi.bench.api import NanoGPTComparison

        return NanoGPTComparison
    raise AttributeError(name)
