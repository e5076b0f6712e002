"""Optimizers: Muon + AdamW in one class, QK-clip (MuonClip), learning-rate schedules, global grad clipping."""

from kimi.optim.grad_clip import clip_grad_norm_, clip_grads_, grad_norm
from kimi.optim.muon import Muon, build_optimizer
from kimi.optim.newton_schulz import newton_schulz
from kimi.optim.qk_clip import QKClip, all_reduce_max
from kimi.optim.schedules import ScheduleState, build_scheduler, lr_lambda, warmup_note

__all__ = [
    "Muon",
    "ScheduleState",
    "QKClip",
    "all_reduce_max",
    "build_optimizer",
    "build_scheduler",
    "lr_lambda",
    "warmup_note",
    "newton_schulz",
    "clip_grad_norm_",
    "clip_grads_",
    "grad_norm",
]
