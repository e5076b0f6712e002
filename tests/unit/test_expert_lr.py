"""optim.expert_lr_mult: the routed experts step at lr x mult, everything else as before; optim.expert_optimizer:
the routed experts step with AdamW, everything else as before."""

import dataclasses

import pytest
import torch

from kimi.config import ConfigError, KimiConfig, MoEConfig, OptimConfig
from kimi.model import KimiModel
from kimi.optim.muon import build_optimizer
from kimi.optim.schedules import build_scheduler


def one_step(mult: float, name: str, **optim) -> tuple[dict, dict, list]:
    """(weights before, after one step with fixed gradients, param groups) for a tiny MoE model."""
    torch.manual_seed(0)
    model = KimiModel(KimiConfig(n_layer=2, n_embd=32, n_head=2, vocab_size=64, block_size=16,
                                 moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=16)))  # fmt: skip
    cfg = OptimConfig(name=name, lr=1e-2, expert_lr_mult=mult, schedule="wsd", warmup_steps=2, **optim)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, max_steps=10)
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    sched.step()
    return before, {n: p.detach().clone() for n, p in model.named_parameters()}, opt.param_groups


@pytest.mark.parametrize("name", ["muon", "adamw"])
def test_routed_experts_step_at_lr_times_the_multiplier(name):
    b1, a1, _ = one_step(1.0, name)
    b3, a3, groups = one_step(3.0, name)
    experts = {n for n in b1 if ".ffn.experts." in n}
    assert experts and {n for g in groups if g["name"].endswith("_experts") for n in g["param_names"]} == experts
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs[f"{name}_experts"] == pytest.approx(3 * lrs[name])  # the schedule keeps the ratio
    for n in b1:
        d1, d3 = a1[n] - b1[n], a3[n] - b3[n]
        if n in experts:  # the whole update (decay included) is lr x (...): x3; Adam's first step is lr x sign
            torch.testing.assert_close(d3, 3 * d1, rtol=1e-5, atol=1e-7)
        else:
            torch.testing.assert_close(d3, d1, rtol=0, atol=0)


def test_default_keeps_the_groups_and_bad_values_are_refused():
    _, _, groups = one_step(1.0, "muon")
    assert [g["name"] for g in groups] == ["muon", "adamw", "adamw_no_decay"]
    with pytest.raises(ConfigError, match="optim.expert_lr_mult=0"):
        dataclasses.replace(OptimConfig(), expert_lr_mult=0.0).validate()
    with pytest.raises(ConfigError, match="optim.expert_optimizer='sgd' must be 'muon' or 'adamw'"):
        dataclasses.replace(OptimConfig(), expert_optimizer="sgd").validate()


@pytest.mark.parametrize("mult", [1.0, 3.0])
def test_adamw_experts_step_as_under_adamw_and_the_rest_as_under_muon(mult):
    """References: the routed experts' update of an all-AdamW optimizer, everything else's of the default."""
    before, after, groups = one_step(mult, "muon", expert_optimizer="adamw")
    _, after_adamw, _ = one_step(mult, "adamw")
    _, after_muon, _ = one_step(mult, "muon")
    experts = {n for n in before if ".ffn.experts." in n}
    in_muon = {n for g in groups if g["use_muon"] for n in g["param_names"]}
    assert experts and not experts & in_muon and in_muon  # the shared experts and attention stay on Muon
    for n in before:
        ref = after_adamw[n] if n in experts else after_muon[n]
        torch.testing.assert_close(after[n], ref, rtol=0, atol=0)
        assert not torch.equal(after[n], before[n])
