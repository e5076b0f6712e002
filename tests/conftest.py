"""Shared pytest fixtures. Keep this file cheap to import: every test run loads it."""

import os

import torch

from tests.mlflow_server import mlflow_server  # noqa: F401  (fixture: a real `mlflow server` on 127.0.0.1)

# Without a GPU, the Triton kernels (kimi.kernels) run only in Triton's CPU interpreter, and Triton reads
# the flag when kimi.kernels is first imported: set it here, before any test (or spawned rank) imports it.
# On a CUDA machine the kernels compile for real and the flag is left alone.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
