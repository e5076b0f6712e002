"""The chunked linear cross-entropy (kimi/model/loss.py) against the plain path it replaces:
F.cross_entropy(F.linear(h, w).float(), t, ignore_index=-1), its loss and the gradients of h and w.

Tolerances: fp32 relative error ||ours - ref|| / ||ref|| <= 1e-6 (only the summation order differs: chunks,
and the fused softmax-minus-one-hot); under bf16 autocast <= 1e-2 against the plain path under the same
autocast (both run the matmuls in bf16; ours rounds each chunk's d w to bf16 before summing in fp32, the
plain path rounds the whole sum once). Seen red with the one-hot subtraction dropped from the gradient.
"""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kimi.config import KimiConfig
from kimi.model import KimiModel
from kimi.model.loss import LMHead, linear_cross_entropy

ROOT = Path(__file__).resolve().parents[2]
N, D, V = 70, 24, 300
TOL = 1e-6


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def inputs(seed=0, ignored=(0, 5, 6, 69)):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g)
    w = torch.randn(V, D, generator=g) * 0.5  # logits of a few units: a softmax far from uniform
    t = torch.randint(0, V, (N,), generator=g)
    t[list(ignored)] = -1
    return h, w, t


def loss_and_grads(fn, h, w, t, scale=1.0):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fn(h, w, t)
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


def plain(h, w, t):
    return F.cross_entropy(F.linear(h, w).float(), t, ignore_index=-1)


def chunked(chunk):
    return lambda h, w, t: linear_cross_entropy(h, w, t, chunk)


@pytest.mark.parametrize("chunk", [16, 70, 1024])  # does not divide N; exactly N; one chunk larger than N
def test_loss_and_grads_match_plain_cross_entropy_fp32(chunk):
    h, w, t = inputs()
    ref = loss_and_grads(plain, h, w, t, scale=0.25)  # a grad_output != 1, as gradient accumulation gives
    got = loss_and_grads(chunked(chunk), h, w, t, scale=0.25)
    for name, a, b in zip(("loss", "d h", "d w"), got, ref):
        assert rel(a, b) <= TOL, (name, rel(a, b))
    assert got[1][[0, 5, 6, 69]].abs().max() == 0  # ignored rows get no gradient


def test_all_targets_ignored_is_nan_loss_with_zero_grads_like_f_cross_entropy():
    h, w, t = inputs(ignored=range(N))
    ref, got = loss_and_grads(plain, h, w, t), loss_and_grads(chunked(16), h, w, t)
    assert ref[0].isnan() and got[0].isnan()
    assert torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2]) and got[2].abs().max() == 0


def test_bf16_autocast_matches_plain_path_under_the_same_autocast():
    h, w, t = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = loss_and_grads(plain, h, w, t)
        got = loss_and_grads(chunked(16), h, w, t)
    for name, a, b in zip(("loss", "d h", "d w"), got, ref):
        assert a.dtype == b.dtype == torch.float32, name  # fp32 inputs get fp32 gradients, as autocast's casts give
        assert rel(a, b) <= 1e-2, (name, rel(a, b))
    assert rel(got[0], loss_and_grads(plain, h, w, t)[0]) > 1e-5  # the matmul did run in bf16


def test_no_grad_forward_gives_the_loss_and_computes_no_gradients():
    h, w, t = inputs()
    with torch.no_grad():
        loss = linear_cross_entropy(h.requires_grad_(), w.requires_grad_(), t, 16)
    assert loss.grad_fn is None and rel(loss, plain(h, w, t).detach()) <= TOL


def _model(**kw):
    cfg = dict(n_layer=2, n_head=2, n_embd=D, vocab_size=V, block_size=24, tie_embeddings=True)
    cfg.update(attention={"kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8})
    cfg.update(moe={"num_experts": 4, "top_k": 2, "expert_hidden": 16, "first_k_dense_replace": 1})
    torch.manual_seed(0)
    return KimiModel(KimiConfig(**cfg, **kw))


def test_model_with_tied_embeddings_matches_the_full_logits_path():
    """Same weights, loss_chunk_tokens 0 vs 7 (which does not divide 3 x 20 tokens): every parameter's
    gradient agrees, the tied embedding/head weight (both uses summed) included; logits are None."""
    full, ours = _model(loss_chunk_tokens=0), _model(loss_chunk_tokens=7)
    ours.load_state_dict(full.state_dict())
    assert ours.lm_head.weight is ours.embed_tokens.weight and ours.lm_head.bias is None
    g = torch.Generator().manual_seed(1)
    idx, tgt = torch.randint(0, V, (3, 20), generator=g), torch.randint(0, V, (3, 20), generator=g)
    tgt[1, :4] = -1
    a, b = full(idx, tgt), ours(idx, tgt)
    assert b.logits is None and a.logits.shape == (3, 20, V)
    assert rel(b.ce_loss, a.ce_loss) <= TOL
    a.loss.backward()
    b.loss.backward()
    grads = dict(full.named_parameters())
    for name, p in ours.named_parameters():
        assert rel(p.grad, grads[name].grad) <= TOL, (name, rel(p.grad, grads[name].grad))
    assert ours(idx).logits.shape == (3, 20, V)  # without targets: the logits, as before


def test_head_forward_runs_through_the_module_so_its_hooks_fire():
    """FSDP2 unshards parameters and tests inject faults through module hooks: the chunked loss is the
    head module's output, not a function of `lm_head.weight` called beside it."""
    head, seen = LMHead(D, V, chunk_tokens=16), []
    head.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    h, _, t = inputs()
    head(h, t)
    head(h)
    assert seen == [torch.Size([]), torch.Size([N, V])]


def test_dry_run_counts_one_chunk_of_logits_and_the_held_gradients():
    from kimi.config import load_config
    from kimi.dry_run import memory_plan

    def activations(chunk):
        cfg = load_config(
            ROOT / "configs" / "bench" / "bpe_small.yaml", ["--train.device=cpu", f"--model.loss_chunk_tokens={chunk}"]
        )
        return memory_plan(cfg, 1)["sizes"]["activations"]

    tokens, V, D = 16 * 256, 50257, 256  # bpe_small: micro-batch 16 x 256, GPT-2 vocabulary, width 256
    full = tokens * V * 4 * 2  # the fp32 logits and their gradient
    chunked = 1024 * V * 4 * 2 + (tokens + V) * D * 4  # one chunk's logits and working copy; d h and d w
    assert activations(0) - activations(1024) == full - chunked
