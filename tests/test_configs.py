"""The config tree (precedence, aliases, errors) and the shipped configs (complete, within 15% of their size)."""

import re
from pathlib import Path

import pytest
import yaml

from kimi.config import Config, ConfigError, KimiConfig, config_from_dict, load_config, parse_overrides
from kimi.summary import main as summary_main
from kimi.summary import summary_lines

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SHIPPED = ["debug", "nano", "small", "medium"]


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_precedence_cli_over_yaml_over_defaults(tmp_path):
    p = write(tmp_path, "model:\n  n_layer: 3\n  n_embd: 96\nmoe:\n  num_experts: 6\ntrain:\n  max_steps: 7\n")
    cfg = load_config(p, ["--model.n_layer=5", "--moe.top_k", "3", "--train.compile"])
    assert cfg.model.n_layer == 5  # CLI beats YAML
    assert cfg.model.n_embd == 96  # YAML beats default
    assert cfg.model.moe.num_experts == 6 and cfg.model.moe.top_k == 3  # `moe:` is model.moe
    assert cfg.train.max_steps == 7 and cfg.train.compile is True
    assert cfg.model.n_head == KimiConfig().n_head  # untouched default
    assert load_config(None).model == KimiConfig()


def test_overrides_reach_nested_sections_and_parse_types():
    cfg = load_config(None, ["--attention.q_lora_rank=32", "--optim.betas=[0.8, 0.9]", "--moe.capacity_factor=1.25"])
    assert cfg.model.attention.q_lora_rank == 32
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.model.moe.capacity_factor == 1.25
    assert load_config(None, ["--attention.q_lora_rank=null"]).model.attention.q_lora_rank is None
    assert parse_overrides(["--model.attention.type=mha"]) == {"model": {"attention": {"type": "mha"}}}


def test_unknown_keys_suggest_the_nearest(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'model.moe.num_expert'.*did you mean 'num_experts'"):
        load_config(None, ["--moe.num_expert=4"])
    with pytest.raises(ConfigError, match="did you mean 'n_layer'"):
        load_config(write(tmp_path, "model:\n  n_layers: 3\n"))
    with pytest.raises(ConfigError, match="unknown config section 'trian'.*did you mean 'train'"):
        load_config(None, ["--trian.max_steps=3"])


def test_wrong_types_and_values_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="model.n_layer='many' should be an integer"):
        load_config(None, ["--model.n_layer=many"])
    with pytest.raises(ConfigError, match="should be true or false"):
        load_config(write(tmp_path, "moe:\n  use_moe: maybe\n"))
    with pytest.raises(ConfigError, match="top_k=9 must be in"):
        load_config(None, ["--moe.top_k=9"])
    with pytest.raises(ConfigError, match="attention.type='gqa'"):
        load_config(None, ["--attention.type=gqa"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="overrides look like"):
        load_config(None, ["n_layer=3"])


def test_round_trip_through_dict_and_yaml():
    cfg = load_config(CONFIGS / "nano.yaml")
    assert config_from_dict(cfg.to_dict()) == cfg
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_is_complete_and_within_15_percent_of_its_size(name):
    path = CONFIGS / f"{name}.yaml"
    text = path.read_text()
    sections = set(yaml.safe_load(text))
    assert {"model", "attention", "moe", "optim", "train", "data"} <= sections
    m = re.search(r"^# size: ~([\d.]+)([MK]) non-embedding params", text, re.M)
    assert m, f"{path} should advertise its size as '# size: ~NM non-embedding params'"
    advertised = float(m.group(1)) * {"M": 1e6, "K": 1e3}[m.group(2)]
    cfg = load_config(path)
    lines = summary_lines(cfg.model)
    n = int(next(ln for ln in lines if ln.startswith("non-embedding params: ")).split(": ")[1].replace(",", ""))
    assert abs(n - advertised) <= 0.15 * advertised, f"{name}: {n} params vs advertised {advertised:.0f}"


def test_debug_config_is_small_and_fast():
    cfg = load_config(CONFIGS / "debug.yaml")
    m = cfg.model
    assert m.n_layer <= 2 and m.n_embd <= 128 and m.vocab_size == 512 and m.block_size == 64
    assert m.moe.num_experts == 4 and cfg.train.max_steps == 20 and cfg.train.global_batch_size == 8
    assert cfg.data.dataset == "toy"


def test_summary_cli(capsys):
    assert summary_main(["--config", str(CONFIGS / "debug.yaml"), "--moe.num_experts=8"]) == 0
    out = capsys.readouterr().out
    grouped = r"\d{1,3}(,\d{3})+"  # thousands separators, as the dry run prints them
    for key in ("non-embedding params", "total params", "active params", "training FLOPs per token"):
        assert re.search(rf"^{key}: {grouped}$", out, re.M), key
    assert re.search(r"^KV-cache bytes per token: \d{1,3}(,\d{3})*$", out, re.M)
    assert "8 experts" in out
    assert summary_main(["--config", str(CONFIGS / "debug.yaml"), "--moe.num_expert=8"]) == 2
    assert "did you mean 'num_experts'" in capsys.readouterr().err


def test_full_tree_defaults_validate():
    assert Config().validate().model.moe.expert_hidden is not None


def test_readme_use_it_reads_what_the_quickstart_writes():
    """README's generate/evaluate/mlflow lines open the directory launch/quickstart.sh (its first command)
    trains into, and that is configs/quickstart.yaml's train.out_dir too."""
    root = CONFIGS.parent
    out = re.search(r"^OUT=\$\{OUT:-(\S+)\}$", (root / "launch" / "quickstart.sh").read_text(), re.M).group(1)
    assert load_config(CONFIGS / "quickstart.yaml").train.out_dir == out
    use_it = (root / "README.md").read_text().split("## Use it", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    dirs = [a or b for a, b in re.findall(r"--checkpoint (\S+)|sqlite:///(\S+)/mlflow\.db", use_it)]
    assert len(dirs) == 3 and set(dirs) == {out}, dirs
