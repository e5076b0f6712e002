"""lr schedules: endpoints, monotonicity, continuity, checkpointing."""

import math

import pytest
import torch

from kimi.config import ConfigError, OptimConfig
from kimi.optim.schedules import build_scheduler, lr_lambda

N = 200


def _curve(**kw):
    cfg = OptimConfig(**kw)
    return cfg, [lr_lambda(s, cfg, N) for s in range(N + 1)]


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
@pytest.mark.parametrize("warmup", [0, 1, 10])
def test_shape(schedule, warmup):
    cfg, f = _curve(schedule=schedule, warmup_steps=warmup, min_lr_ratio=0.1, decay_fraction=0.2)
    if warmup:
        assert f[0] == pytest.approx(1 / warmup) and f[warmup - 1] == 1.0
        assert all(a < b for a, b in zip(f[: warmup - 1], f[1:warmup]))  # strictly increasing warmup
    assert max(f) == 1.0 and min(f) > 0
    post = f[max(0, warmup - 1) :]
    assert all(b <= a + 1e-12 for a, b in zip(post, post[1:]))  # then non-increasing
    # continuity: no jump bigger than one warmup increment or one step of the decay
    bound = max(1 / max(warmup, 1), 0.9 * math.pi / 2 / (N - warmup), 0.9 / (0.2 * N)) + 1e-9
    assert max(abs(b - a) for a, b in zip(f, f[1:])) <= bound
    end = {"cosine": 0.1, "wsd": 0.1, "constant": 1.0}[schedule]
    assert f[N] == pytest.approx(end, abs=1e-12)


def test_wsd_stable_then_linear():
    cfg, f = _curve(schedule="wsd", warmup_steps=10, min_lr_ratio=0.0, decay_fraction=0.25)
    assert all(v == 1.0 for v in f[9:150])  # stable until the last 25% (step 150)
    assert f[175] == pytest.approx(0.5) and f[200] == 0.0
    diffs = [a - b for a, b in zip(f[150:200], f[151:201])]
    assert max(diffs) - min(diffs) < 1e-12  # linear


def test_cosine_midpoint():
    cfg, f = _curve(schedule="cosine", warmup_steps=0, min_lr_ratio=0.0)
    assert f[100] == pytest.approx(0.5)


def test_scheduler_drives_lr_and_checkpoints():
    cfg = OptimConfig(schedule="cosine", warmup_steps=5, lr=1e-2)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, 50)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([cfg.lr * (s + 1) / 5 for s in range(5)])
    state = sched.state_dict()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=cfg.lr)
    sched2 = build_scheduler(opt2, cfg, 50)
    sched2.load_state_dict(state)
    for _ in range(3):
        opt.step(), sched.step(), opt2.step(), sched2.step()
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert opt.param_groups[0]["lr"] == pytest.approx(cfg.lr * lr_lambda(23, cfg, 50))


def test_bad_config():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    with pytest.raises(ConfigError, match="min_lr_ratio"):
        build_scheduler(opt, OptimConfig(min_lr_ratio=1.5), 10)
    with pytest.raises(ConfigError, match="max_steps"):
        build_scheduler(opt, OptimConfig(), 0)
    with pytest.raises(ConfigError, match="schedule"):
        build_scheduler(opt, OptimConfig(schedule="linear"), 10)
