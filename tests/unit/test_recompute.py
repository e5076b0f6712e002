"""Selective recompute (moe.recompute, attention.recompute_kv) on the debug model: the same numbers, less kept.

Recompute replays deterministic CPU ops on the same inputs, so the loss, every gradient, the routing counts
(and so the router-bias update) and QK-clip's max logits must equal the plain path's bit for bit, with the
switches alone and nested inside whole-block activation checkpointing (whose recompute, with early stop off,
replays the routing: counted once all the same). Each switch must free what it names (the bytes still
alive after a forward drop by at least those tensors' size) and rerun no expensive op in backward.
"""

from __future__ import annotations

import gc
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import set_checkpoint_early_stop

from kimi.config import load_config
from kimi.kernels import HAS_TRITON
from kimi.model import KimiModel
from kimi.model.recompute import ATTENTION, MATMULS
from kimi.parallel.parallelize import apply_activation_checkpointing

ROOT = Path(__file__).resolve().parents[2]
B, T = 4, 64
SWITCHES = {"moe": "--moe.recompute=true", "kv": "--attention.recompute_kv=true"}
# debug.yaml's v_head_dim (32) differs from its q/k head dim (48), so CPU SDPA takes its math decomposition;
# 48 gives the fused CPU kernel, whose output the K/V region keeps rather than recomputes.
FUSED_ATTENTION = "--attention.v_head_dim=48"


def build(*overrides: str, block_ac: bool = False) -> KimiModel:
    cfg = load_config(ROOT / "configs" / "debug.yaml", list(overrides))
    torch.manual_seed(0)
    model = KimiModel(cfg.model).train()
    if block_ac:
        apply_activation_checkpointing(model)
    return model


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 512, (B, T), generator=g), torch.randint(0, 512, (B, T), generator=g)


def step(model: KimiModel, early_stop: bool = True) -> dict:
    idx, tgt = batch()
    with set_checkpoint_early_stop(early_stop):  # False: a recompute replays all of the forward, counting included
        loss = model(idx, tgt).loss
    loss.backward()
    moes = model.moe_layers()
    out = {
        "loss": loss.detach(),
        "counts": [m.tokens_per_expert.clone() for m in moes],
        "entropy": [m._entropy_sum.clone() for m in moes],
        "max_logits": [a.max_logits_H.clone() for a in model.attention_layers()],
    }
    out |= {"grad " + n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()}
    for m in moes:
        m.update_bias()
    out["bias"] = [m.router.expert_bias.clone() for m in moes]
    with torch.no_grad():
        out["eval logits"] = model.eval()(idx).logits  # no autograd: the regions are plain calls
    return out


@pytest.mark.parametrize("attention", ["math", "fused"])
@pytest.mark.parametrize(
    "switches, block_ac", [(["moe"], False), (["kv"], False), (["moe", "kv"], False), (["moe", "kv"], True)]
)
def test_recompute_changes_no_number(attention, switches, block_ac):
    base = [FUSED_ATTENTION] if attention == "fused" else []
    ref = step(build(*base))
    got = step(build(*base, *(SWITCHES[s] for s in switches), block_ac=block_ac), early_stop=not block_ac)
    assert got.keys() == ref.keys()
    for k, v in ref.items():
        same = all(map(torch.equal, v, got[k])) if isinstance(v, list) else torch.equal(v, got[k])
        assert same, f"{k} differs with {switches} (block checkpointing: {block_ac})"


@pytest.mark.skipif(not HAS_TRITON, reason="moe.kernels=triton needs Triton (on CPU, its interpreter)")
def test_moe_recompute_with_the_triton_gather():
    """The Triton gather (a custom autograd.Function with a Plan) is recomputed in the region like index_select."""
    ref = step(build("--moe.kernels=triton"))
    got = step(build("--moe.kernels=triton", SWITCHES["moe"]))
    for k, v in ref.items():
        assert all(map(torch.equal, v, got[k])) if isinstance(v, list) else torch.equal(v, got[k]), k


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages that ops under this mode created and that are still referenced (by autograd's
    saved tensors, recompute caches, outputs) when `alive()` is called."""

    def __init__(self):
        super().__init__()
        self.refs: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                old = self.refs.get(s.data_ptr())
                if old is None or old[0].expired():
                    self.refs[s.data_ptr()] = (StorageWeakRef(s), s.nbytes())
        return out

    def alive(self) -> int:
        gc.collect()
        return sum(n for ref, n in self.refs.values() if not ref.expired())


def kept_after_forward(*overrides: str) -> int:
    model = build(*overrides)
    idx, tgt = batch()
    with LiveBytes() as live:
        loss = model(idx, tgt).loss
    kept = live.alive()
    del loss
    return kept


def test_each_switch_frees_what_it_names():
    cfg = load_config(ROOT / "configs" / "debug.yaml", [FUSED_ATTENTION]).model
    a, m = cfg.attention, cfg.moe
    N, n_moe, fp32 = B * T * m.top_k, cfg.n_layer - m.first_k_dense_replace, 4
    plain = kept_after_forward(FUSED_ATTENTION)
    # moe.recompute: the gathered rows (N x D) and silu(W1 x) (N x F) of each MoE layer
    moe_saved = plain - kept_after_forward(FUSED_ATTENTION, SWITCHES["moe"])
    assert moe_saved >= n_moe * N * (cfg.n_embd + m.expert_hidden) * fp32, moe_saved
    # attention.recompute_kv with a fused kernel: the K/V expansion (n + v per head) and the keys as attention
    # takes them (n + R per head), per token and layer, less the shared rope key the region keeps (R)
    kv_saved = plain - kept_after_forward(FUSED_ATTENTION, SWITCHES["kv"])
    expanded = cfg.n_head * (2 * a.qk_nope_head_dim + a.v_head_dim + a.qk_rope_head_dim) - a.qk_rope_head_dim
    assert kv_saved >= cfg.n_layer * B * T * expanded * fp32, kv_saved


class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func] += 1
        return func(*args, **(kwargs or {}))


def ops_in_backward(*overrides: str) -> Counter:
    model = build(FUSED_ATTENTION, *overrides)
    loss = model(*batch()).loss
    with OpCount() as ops:
        loss.backward()
    return ops.counts


def test_regions_recompute_only_cheap_ops():
    """Backward reruns no fused attention kernel and no expert matmul: the regions keep those outputs. The K/V
    region reruns exactly one matmul per layer, kv_b_proj (latent -> per-head K/V), its point."""
    plain = ops_in_backward()
    n_layer = load_config(ROOT / "configs" / "debug.yaml").model.n_layer
    for name, switch in SWITCHES.items():
        on = ops_in_backward(switch)
        assert sum(on.values()) > sum(plain.values()), f"{switch}: nothing was recomputed"
        for op in MATMULS | ATTENTION:
            extra = n_layer if (name, op) == ("kv", torch.ops.aten.mm.default) else 0
            assert on[op] == plain[op] + extra, (
                f"{switch}: backward ran {op} {on[op]} times, the plain path {plain[op]}"
            )
