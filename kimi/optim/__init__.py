"""Optimizers: Muon + AdamW in one class, QK-clip (MuonClip), learning-rate schedules, global grad clipping."""

from kimi.optim.muon import Muon, build_optimizer, newton_schulz

__all__ = ["Muon", "build_optimizer", "newton_schulz"]
