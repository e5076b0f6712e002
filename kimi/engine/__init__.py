"""Engines: what wraps the model and steps it (FSDP2 or DeepSpeed), behind one interface (base.py)."""

from kimi.engine.base import Engine, build_engine

__all__ = ["Engine", "build_engine"]
