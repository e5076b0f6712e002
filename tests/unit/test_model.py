"""KimiModel: losses, input checks, checkpoint round trips, parameter naming and counting."""

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kimi.config import KimiConfig
from kimi.model import KimiModel, ModelOutput

V = 96


def cfg(**kw):
    base = dict(
        n_layer=3,
        n_head=2,
        n_embd=32,
        vocab_size=V,
        block_size=24,
        attention={"kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8},
        moe={"num_experts": 4, "top_k": 2, "expert_hidden": 16, "first_k_dense_replace": 1, "seq_aux_loss_coef": 0.01},
    )
    base.update(kw)
    return KimiConfig(**base)


def tokens(b=2, t=10, seed=0):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("chunk", [0, 7])  # the full logits; the chunked loss (kimi/model/loss.py), logits None
def test_loss_is_ce_plus_aux_and_ignores_minus_one(chunk):
    torch.manual_seed(0)
    m = KimiModel(cfg(loss_chunk_tokens=chunk))
    idx, tgt = tokens(), tokens(seed=1)
    tgt[0, :3] = -1
    out = m(idx, tgt)
    assert isinstance(out, ModelOutput) and (out.logits is None) == (chunk > 0)
    ref_ce = F.cross_entropy(m(idx).logits.view(-1, V), tgt.view(-1), ignore_index=-1)
    torch.testing.assert_close(out.ce_loss, ref_ce)
    aux = sum(moe.aux_loss for moe in m.moe_layers())
    assert float(out.aux_loss.detach()) > 0 and len(m.moe_layers()) == 2
    torch.testing.assert_close(out.aux_loss, aux)
    torch.testing.assert_close(out.loss, out.ce_loss + out.aux_loss)
    out.loss.backward()
    assert m.layers[1].ffn.router.weight.grad.abs().sum() > 0
    none = m(idx)
    assert none.loss is None and none.ce_loss is None and none.aux_loss is None and none.logits.shape == (2, 10, V)
    off = KimiModel(cfg(moe={"num_experts": 4, "top_k": 2, "expert_hidden": 16}))(idx, tgt)
    assert off.aux_loss.dim() == 0 and float(off.aux_loss) == 0.0


def test_bad_inputs_raise_clear_errors():
    m = KimiModel(cfg())
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 96\).*\[0, 96\]"):
        m(torch.tensor([[0, 96]]))
    with pytest.raises(ValueError, match="token ids"):
        m(torch.tensor([[-3, 1]]))
    with pytest.raises(ValueError, match="targets"):
        m(tokens(), torch.full((2, 10), 500))
    with pytest.raises(ValueError, match="block_size=24"):
        m(tokens(t=25))
    with pytest.raises(ValueError, match="batch, time"):
        m(torch.zeros(5, dtype=torch.long))


def test_small_training_run_reduces_loss():
    torch.manual_seed(0)
    for c in (cfg(), cfg(attention={"type": "mha"}, moe={"use_moe": False})):
        m = KimiModel(c)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        idx = tokens(2, 12)
        first = None
        for _ in range(6):
            loss = m(idx, idx.roll(-1, 1)).loss
            first = first if first is not None else float(loss.detach())
            opt.zero_grad()
            loss.backward()
            opt.step()
            for moe in m.moe_layers():
                moe.update_bias()
        assert float(loss.detach()) < first - 0.5


def test_parameter_names_follow_the_optimizer_split():
    m = KimiModel(cfg(attention={"q_lora_rank": 12}))
    names = [n for n, _ in m.named_parameters()]
    assert [n for n in names if "router" in n] == ["layers.1.ffn.router.weight", "layers.2.ffn.router.weight"]
    assert [n for n in names if "embed_tokens" in n or "lm_head" in n] == ["embed_tokens.weight", "lm_head.weight"]
    for part in (
        "q_a_proj",
        "q_a_layernorm",
        "q_b_proj",
        "kv_a_proj_with_mqa",
        "kv_a_layernorm",
        "kv_b_proj",
        "o_proj",
    ):
        assert f"layers.0.attn.{part}.weight" in names
    assert "layers.1.ffn.experts.w1" in names and m.layers[1].ffn.experts.w2.shape == (4, 32, 16)
    assert "layers.1.ffn.router.expert_bias" in m.state_dict()
    assert "layers.1.ffn.tokens_per_expert" not in m.state_dict()
    assert "layers.0.attn.max_logits_H" not in m.state_dict()


def test_counting_by_hand():
    c = cfg()
    m = KimiModel(c)
    D, H, C, n, r, v = 32, 2, 16, 8, 4, 8
    attn = D * H * (n + r) + D * (C + r) + C + C * H * (n + v) + H * v * D
    dense = 3 * D * c.intermediate_size
    routed, shared, router = 4 * 3 * D * 16, 3 * D * 16, 4 * D
    norms = 2 * D
    non_emb = 3 * (attn + norms) + dense + 2 * (routed + shared + router) + D
    assert m.num_params(non_embedding=True) == non_emb
    assert m.num_params() == non_emb + 2 * V * D
    assert m.num_active_params() == m.num_params() - 2 * routed // 2
    seq = 24
    assert m.flops_per_token(seq) == 6 * (m.num_active_params(True) + V * D) + 3 * 6 * H * (n + r + v) * seq
    tied = KimiModel(cfg(tie_embeddings=True))
    assert tied.lm_head.weight is tied.embed_tokens.weight and tied.num_params() == non_emb + V * D


def test_meta_build_then_init_weights():
    with torch.device("meta"):
        m = KimiModel(cfg())
    assert m.num_params() > 0
    m = m.to_empty(device="cpu")
    m.init_weights()
    out = m(tokens(), tokens(seed=3))
    assert torch.isfinite(out.loss)
    assert all((moe.router.expert_bias == 0).all() for moe in m.moe_layers())


def test_model_package_never_imports_torch_distributed():
    """Single-device code. The bans on kimi.parallel, checkpoint, engine, optim, data and tracking are
    import-linter contracts (pyproject.toml, .ci/lint-imports); torch.distributed is here because
    import-linter cannot forbid a subpackage of an external package."""
    forbidden = ("torch.distributed",)
    for path in Path("kimi/model").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            for mod in mods:
                assert not mod.startswith(forbidden), f"{path} imports {mod}"


def test_tests_never_skip_on_the_projects_own_imports():
    """pytest.importorskip("kimi...") would turn a broken import of our own code into a skip, not a failure."""
    for path in Path(__file__).resolve().parents[1].rglob("*.py"):  # all of tests/
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "importorskip" and node.args:
                arg = node.args[0]
                mod = arg.value if isinstance(arg, ast.Constant) else ""
                assert not str(mod).startswith("kimi"), f"{path.name}:{node.lineno} importorskip({mod!r})"
