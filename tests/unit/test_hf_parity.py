"""Parity with transformers' DeepSeek-V3 (Kimi K2's architecture), through `python -m kimi.convert` both ways.

Tolerance: relative error ||ours - HF|| / ||HF|| <= 1e-5 on fp32 CPU logits (differences are op order only).
Every parameter is perturbed (norm weights too) and the routing bias is random and nonzero, so a wrong
mapping, a swapped norm or a bias used in the weights instead of only the selection would show up.
The `grouped` cases route away from every default (8 experts in 4 groups, 2 groups kept,
norm_topk_prob=false, routed_scaling_factor 1.7) and check that each of those fields moves the logits
by far more than the tolerance, so a converter that dropped or hard-coded one would fail.
"""

import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kimi import load_model  # noqa: E402
from kimi.config import KimiConfig, RopeScalingConfig  # noqa: E402
from kimi.convert import main as convert_main  # noqa: E402
from kimi.model import KimiModel  # noqa: E402

TOL = 1e-5


def rel_err(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def hf_config(q_lora_rank, rope_interleave=True, **kw):
    args = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        n_shared_experts=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        kv_lora_rank=32,
        q_lora_rank=q_lora_rank,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        max_position_embeddings=64,
        rope_interleave=rope_interleave,
        initializer_range=0.1,
        rms_norm_eps=1e-5,  # differs from the latent norms' fixed 1e-6, as in real checkpoints
    )
    args.update(kw)
    return transformers.DeepseekV3Config(**args)


def random_hf_model(cfg, seed=0):
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(cfg).float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.3)
    return model


def tokens(seed=3):
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(seed))


# Group-limited routing with none of the routing fields at its default (HF: n_group/topk_group 1,
# norm_topk_prob true, routed_scaling_factor 1).
GROUPED = dict(n_routed_experts=8, n_group=4, topk_group=2, norm_topk_prob=False, routed_scaling_factor=1.7)


def assert_routing_fields_matter(ours: KimiModel, idx, ref_logits) -> None:
    """Each routing field, set to what a converter that ignored it would write, moves the logits far
    beyond TOL: the parity above can only hold if the converter carried all of them."""
    moe = ours.config.moe
    wrong = {
        "norm_topk_prob": not moe.norm_topk_prob,
        "topk_group": 1 if moe.topk_group != 1 else moe.n_group,
        "n_group": 1,
        "routed_scaling_factor": 1.0,
    }
    for field, value in wrong.items():
        for m in ours.moe_layers():
            m.cfg = dataclasses.replace(moe, **{field: value})
        with torch.no_grad():
            assert rel_err(ours(idx).logits, ref_logits) > 100 * TOL, field
    for m in ours.moe_layers():
        m.cfg = moe


def test_the_checkouts_kernels_folder_does_not_shadow_the_pypi_kernels_package():
    """transformers >= 5.25 imports the PyPI package `kernels` on `import transformers.activations`; the
    checkout's top-level kernels/ (kimi.kernels) must not be found under that name first (tests/conftest.py,
    pyproject's --import-mode=append), or every DeepSeek-V3 model build here fails with an ImportError."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("kernels")
    ours = Path(__file__).resolve().parents[2] / "kernels"
    assert spec is None or Path(spec.origin).parent != ours, f"`import kernels` finds {spec.origin}"
    transformers.DeepseekV3Config  # noqa: B018  (resolves transformers' lazy module, which imports `kernels`)


@pytest.mark.parametrize(
    "q_lora_rank,interleave,routing",
    [(None, True, {}), (24, True, {}), (24, False, {}), (None, True, GROUPED)],
    ids=["q-plain", "q-lora", "no-interleave", "grouped"],
)
def test_from_hf_then_back_to_hf(tmp_path, q_lora_rank, interleave, routing):
    hf = random_hf_model(hf_config(q_lora_rank, interleave, **routing))
    hf.save_pretrained(tmp_path / "hf")
    assert convert_main(["--from-hf", str(tmp_path / "hf"), str(tmp_path / "kimi.pt")]) == 0
    ours = load_model(tmp_path / "kimi.pt").eval()
    assert ours.moe_layers()[0].router.expert_bias.abs().sum() > 0
    idx = tokens()
    with torch.no_grad():
        ref = hf(idx).logits
        got = ours(idx).logits
    err = rel_err(got, ref)
    print(f"from-hf {q_lora_rank=} {interleave=} {routing=}: rel err {err:.2e}")
    assert err <= TOL
    if routing:
        assert_routing_fields_matter(ours, idx, ref)

    # the routing bias matters (selection only): zeroing it must change the logits
    with torch.no_grad():
        for m in ours.moe_layers():
            m.router.expert_bias.zero_()
        assert rel_err(ours(idx).logits, ref) > 1e-3

    assert convert_main(["--to-hf", str(tmp_path / "kimi.pt"), str(tmp_path / "back")]) == 0
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").float().eval()
    with torch.no_grad():
        err2 = rel_err(hf2(idx).logits, ref)
    print(f"to-hf {q_lora_rank=} {interleave=} {routing=}: rel err {err2:.2e}")
    assert err2 <= TOL


NATIVE_ROUTING = {
    "default": dict(num_experts=4, n_group=2, topk_group=2, routed_scaling_factor=1.5),
    "grouped": dict(num_experts=8, n_group=4, topk_group=2, norm_topk_prob=False, routed_scaling_factor=1.7),
}


@pytest.mark.parametrize("routing", list(NATIVE_ROUTING))
def test_kimi_model_to_hf(tmp_path, routing):
    """A natively built nanoKimi model (random routing bias, tied embeddings) exported and run by HF."""
    moe = {"top_k": 2, "expert_hidden": 16, **NATIVE_ROUTING[routing]}
    torch.manual_seed(5)
    cfg = KimiConfig(
        n_layer=2,
        n_head=2,
        n_embd=32,
        vocab_size=256,
        block_size=32,
        tie_embeddings=True,
        attention={
            "q_lora_rank": 16,
            "kv_lora_rank": 16,
            "qk_nope_head_dim": 8,
            "qk_rope_head_dim": 4,
            "v_head_dim": 8,
        },
        moe=moe,
        init_std=0.1,
    )
    ours = KimiModel(cfg).eval()
    with torch.no_grad():
        for m in ours.moe_layers():
            m.router.expert_bias.copy_(torch.randn(m.num_experts) * 0.3)
        for n, p in ours.named_parameters():
            if "norm" in n:
                p.add_(torch.randn(p.shape) * 0.1)
    torch.save({"config": dataclasses.asdict(cfg), "model": ours.state_dict()}, tmp_path / "k.pt")
    assert convert_main(["--to-hf", str(tmp_path / "k.pt"), str(tmp_path / "hf"), "--max-shard-size=40KB"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is True
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted((tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {f.name for f in shards}
    assert all(f.stat().st_size < 40_000 + 4096 for f in shards)  # 40 KB of tensors + a header
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").float().eval()
    idx = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = hf(idx).logits
        err = rel_err(ours(idx).logits, ref)
    print(f"kimi->hf {routing}: rel err {err:.2e}")
    assert err <= TOL
    if routing == "grouped":  # ("default" keeps 2 of 2 groups: there n_group and topk_group are moot)
        assert_routing_fields_matter(ours, idx, ref)


def test_fused_in_memory_expert_layout_converts(tmp_path):
    """transformers v5 holds experts fused (gate_up_proj (E, 2F, D), down_proj (E, D, F)); files written
    straight from its state_dict use that layout instead of per-expert tensors."""
    from safetensors.torch import save_file

    hf = random_hf_model(hf_config(None), seed=7)
    sd = hf.state_dict()
    assert "model.layers.1.mlp.experts.gate_up_proj" in sd
    d = tmp_path / "fused"
    d.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(hf.config.to_json_string())
    assert convert_main(["--from-hf", str(d), str(tmp_path / "k.pt")]) == 0
    ours = load_model(tmp_path / "k.pt").eval()
    idx = tokens()
    with torch.no_grad():
        assert rel_err(ours(idx).logits, hf(idx).logits) <= TOL


# YaRN as published: Kimi K2 (beta_fast = beta_slow = 1: a one-dim ramp; mscale = mscale_all_dim), DeepSeek-V3
# (beta 32 / 1), and a cos/sin gain != 1 (mscale != mscale_all_dim). Original context 16, tokens up to 63:
# 4x the original context, the whole of max_position_embeddings.
YARN = {
    "k2": dict(factor=4.0, beta_fast=1.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
    "v3": dict(factor=4.0, beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
    "gain": dict(factor=3.0, beta_fast=16.0, beta_slow=2.0, mscale=0.707, mscale_all_dim=1.0),
    "bare": dict(factor=4.0),  # HF's defaults for the rest
}


@pytest.mark.parametrize("variant", list(YARN))
def test_yarn_matches_hf_beyond_the_original_context(tmp_path, variant):
    """Published configs spell it `rope_scaling` with `type` (transformers 4); transformers 5 reads that
    too. Logits match HF at positions 0..63 of a model pre-trained at 16 (4x), both ways, and in the last
    quarter (48..63) alone."""
    scaling = {"type": "yarn", "original_max_position_embeddings": 16, **YARN[variant]}
    hf = random_hf_model(hf_config(24, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, **scaling}))
    hf.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg.pop("rope_parameters")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "rope_theta": 10000.0, "rope_scaling": scaling}))
    assert convert_main(["--from-hf", str(tmp_path / "hf"), str(tmp_path / "kimi.pt")]) == 0
    ours = load_model(tmp_path / "kimi.pt").eval()
    assert ours.config.attention.rope_scaling.type == "yarn"
    idx = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, got = hf(idx).logits, ours(idx).logits
        print(f"yarn {variant}: rel err 0..63 {rel_err(got, ref):.2e}, 48..63 {rel_err(got[:, 48:], ref[:, 48:]):.2e}")
        assert rel_err(got, ref) <= TOL and rel_err(got[:, 48:], ref[:, 48:]) <= TOL
        plain = KimiModel(dataclasses.replace(ours.config, attention=dataclasses.replace(
            ours.config.attention, rope_scaling=RopeScalingConfig()))).eval()  # fmt: skip
        plain.load_state_dict(ours.state_dict())
        assert rel_err(plain(idx).logits, ref) > 100 * TOL  # the scaling is carried, not a no-op here
    assert convert_main(["--to-hf", str(tmp_path / "kimi.pt"), str(tmp_path / "back")]) == 0
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").float().eval()
    with torch.no_grad():
        assert rel_err(hf2(idx).logits, ref) <= TOL


def _write_hf(tmp_path, **kw):
    cfg = hf_config(None, **kw)
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(cfg.to_json_string())
    return d


@pytest.mark.parametrize(
    "kw,why",
    [
        (
            {
                "rope_parameters": {
                    "rope_type": "linear",
                    "factor": 4.0,
                    "rope_theta": 10000.0,
                }
            },
            "RoPE scaling 'linear'",
        ),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"attention_bias": True}, "attention_bias"),
    ],
)
def test_unrepresentable_hf_configs_are_refused(tmp_path, capsys, kw, why):
    d = _write_hf(tmp_path, **kw)
    assert convert_main(["--from-hf", str(d), str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert why in err and err.count("\n") == 1
    assert not (tmp_path / "x.pt").exists()


def test_to_hf_refuses_the_mha_baseline(tmp_path, capsys):
    cfg = KimiConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=64, attention={"type": "mha"}, moe={"use_moe": False})
    torch.save({"config": dataclasses.asdict(cfg), "model": KimiModel(cfg).state_dict()}, tmp_path / "m.pt")
    assert convert_main(["--to-hf", str(tmp_path / "m.pt"), str(tmp_path / "out")]) == 2
    assert "attention.type='mha'" in capsys.readouterr().err
