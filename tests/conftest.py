"""Shared pytest fixtures. Keep this file cheap to import: every test run loads it."""

import os

import pytest
import torch

from tests.mlflow_server import mlflow_server  # noqa: F401  (fixture: a real `mlflow server` on 127.0.0.1)

# Without a GPU, the Triton kernels (kimi.kernels) run only in Triton's CPU interpreter, and Triton reads
# the flag when kimi.kernels is first imported: set it here, before any test (or spawned rank) imports it.
# On a CUDA machine the kernels compile for real and the flag is left alone.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _no_leaked_process_group():
    """A test that leaves torch.distributed initialized breaks every later one that runs world 1 in this
    process (seen as 'default process group twice' in an unrelated test): fail the leaker instead."""
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        pytest.fail("the test left a torch.distributed process group initialized; destroy it in a finally")
