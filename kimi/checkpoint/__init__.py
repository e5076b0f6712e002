"""Checkpoints: atomic step directories (store.py) and the trainer's resume policy (resume.py).

Formats are the engines' (kimi/engine/): this package never asks which engine wrote a step beyond the
name recorded in its meta.json.
"""

from kimi.checkpoint.resume import Checkpointer, config_changes
from kimi.checkpoint.store import (
    META,
    CheckpointError,
    CheckpointStore,
    complete_steps,
    read_meta,
    resolve,
    step_number,
    verify,
)

__all__ = [
    "META",
    "CheckpointError",
    "CheckpointStore",
    "Checkpointer",
    "complete_steps",
    "config_changes",
    "read_meta",
    "resolve",
    "step_number",
    "verify",
]
