"""Shared pytest fixtures. Keep this file cheap to import: every test run loads it."""

import os
import sys

import pytest
import torch

from tests.mlflow_server import mlflow_server  # noqa: F401  (fixture: a real `mlflow server` on 127.0.0.1)

# The checkout's top-level kernels/ folder (installed as kimi.kernels) is importable as a top-level `kernels`
# whenever the checkout's root precedes site-packages on sys.path (`python -m pytest` puts the working
# directory first; pytest puts the root of the `tests` package first), and then it shadows the PyPI package
# `kernels` that transformers >= 5.25 imports on `import transformers.activations`. Keep the root, last.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_root_entries = [p for p in sys.path if os.path.abspath(p or os.curdir) == _ROOT]
sys.path[:] = [p for p in sys.path if p not in _root_entries] + _root_entries

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
