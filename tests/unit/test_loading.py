"""kimi.load_model: .pt files and checkpoint directories -> KimiModel, with one-line errors. (Real
directories of both engines are read in test_generate, test_train_dist and test_train_deepspeed.)"""

import dataclasses
import sys
import types
from pathlib import Path

import pytest
import torch

from kimi import load_model
from kimi.config import Config
from kimi.model import KimiModel
from tests.unit.test_model import cfg, tokens


@pytest.mark.parametrize("as_full_tree", [True, False])
def test_load_model_round_trip_through_a_pt_file(tmp_path, as_full_tree):
    torch.manual_seed(1)
    c = cfg(
        attention={"q_lora_rank": 12, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8}
    )
    m = KimiModel(c).eval()
    m.moe_layers()[0].router.expert_bias.copy_(torch.randn(4))  # buffers travel too
    cfg_dict = Config(model=c).to_dict() if as_full_tree else dataclasses.asdict(c)
    torch.save({"config": cfg_dict, "model": m.state_dict()}, tmp_path / "ck.pt")
    m2 = load_model(tmp_path / "ck.pt")
    assert m2.config == c
    idx = tokens()
    with torch.no_grad():
        assert torch.equal(m(idx).logits, m2.eval()(idx).logits)


def test_load_model_errors_are_one_line(tmp_path):
    m = KimiModel(cfg())
    sd = m.state_dict()
    sd["layers.0.attn.kv_b_proj.weight"] = torch.zeros(3, 3)
    torch.save({"config": dataclasses.asdict(m.config), "model": sd}, tmp_path / "bad.pt")
    with pytest.raises(
        ValueError, match=r"'layers.0.attn.kv_b_proj.weight' has shape \(3, 3\) but the model expects \(32, 16\)"
    ):
        load_model(tmp_path / "bad.pt")
    sd = m.state_dict()
    del sd["norm.weight"]
    sd["extra.weight"] = torch.zeros(1)
    torch.save({"config": dataclasses.asdict(m.config), "model": sd}, tmp_path / "keys.pt")
    with pytest.raises(ValueError, match=r"missing 1 key\(s\).*norm.weight.*unexpected 1 key\(s\).*extra.weight"):
        load_model(tmp_path / "keys.pt")
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a nanoKimi checkpoint"):
        load_model(tmp_path / "foreign.pt")
    (tmp_path / "junk.pt").write_text("not a torch file")
    with pytest.raises(ValueError, match=r"junk.pt' is not a nanoKimi checkpoint \(not a file torch.save wrote\)"):
        load_model(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "nope.pt")
    torch.save({"config": {"n_layer": 2, "n_heads": 4}, "model": {}}, tmp_path / "cfg.pt")
    with pytest.raises(ValueError, match="did you mean 'n_head'"):
        load_model(tmp_path / "cfg.pt")


def test_load_model_reads_directories_through_the_engines_reader(tmp_path, monkeypatch):
    m = KimiModel(cfg())
    seen = []

    def read_model_state(path):
        seen.append(Path(path))
        return Config(model=m.config).to_dict(), {"_orig_mod." + k: v for k, v in m.state_dict().items()}

    monkeypatch.setitem(sys.modules, "kimi.engine", types.SimpleNamespace(read_model_state=read_model_state))
    m2 = load_model(tmp_path)
    assert seen == [tmp_path]
    assert torch.equal(m2.lm_head.weight, m.lm_head.weight)
