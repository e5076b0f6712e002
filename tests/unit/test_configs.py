"""The config tree (precedence, aliases, errors) and the shipped configs (complete, within 15% of their size)."""

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from kimi.config import (
    Config,
    ConfigError,
    DeepSpeedConfig,
    KimiConfig,
    MoEConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
    config_from_dict,
    flatten_dict,
    load_config,
    merge_dicts,
    parse_overrides,
)
from kimi.config_help import config_help, field_docs, sections
from kimi.summary import main as summary_main
from kimi.summary import summary_lines

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SHIPPED = ["debug", "nano", "small", "medium", "moonlight"]


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
    m = re.search(r"^# size: ~([\d.]+)([BMK]) non-embedding params", text, re.M)
    assert m, f"{path} should advertise its size as '# size: ~NM non-embedding params'"
    advertised = float(m.group(1)) * {"B": 1e9, "M": 1e6, "K": 1e3}[m.group(2)]
    cfg = load_config(path)
    lines = summary_lines(cfg.model)
    n = int(next(ln for ln in lines if ln.startswith("non-embedding params: ")).split(": ")[1].replace(",", ""))
    assert abs(n - advertised) <= 0.15 * advertised, f"{name}: {n} params vs advertised {advertised:.0f}"


@pytest.mark.parametrize("path", sorted((CONFIGS / "bench").glob("*.yaml")), ids=lambda p: p.name)
def test_bench_configs_load_and_build(path):
    assert summary_lines(load_config(path).model)  # builds on the meta device


def test_moonlight_config_is_the_published_one(tmp_path):
    """configs/moonlight.yaml's model is what Moonlight-16B-A3B's config.json (as published, in
    tests/fixtures) converts to: the same check --init-from-hf makes against the folder, which refuses a
    mismatch. Its block_size is the run's (4096 of the 8192 the model was trained to)."""
    from kimi.checkpoint.hf import check_model_matches_hf

    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "moonlight_config.json"
    (tmp_path / "config.json").write_text(fixture.read_text())
    cfg = load_config(CONFIGS / "moonlight.yaml")
    check_model_matches_hf(cfg.model, tmp_path)
    lines = summary_lines(cfg.model)
    assert "total params: 15,960,108,544" in lines and "active params: 2,914,774,528" in lines
    with pytest.raises(ValueError, match="model.moe.routed_scaling_factor=2.5 vs 2.446"):
        check_model_matches_hf(
            dataclasses.replace(cfg.model, moe=dataclasses.replace(cfg.model.moe, routed_scaling_factor=2.5)), tmp_path
        )


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


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
# tests/fixtures/config_a916084.yaml: the config.yaml inside a checkpoint written by commit a916084 (before the
# config tree moved onto pydantic and DeepSpeed's fields into parallel.deepspeed), from
#   python -m kimi.train --config configs/debug.yaml --train.max_steps=1 --logging.mlflow=false \
#       --train.out_dir=/tmp/cfgfix
OLD_RUN = ["--train.max_steps=1", "--logging.mlflow=false", "--train.out_dir=/tmp/cfgfix"]


def test_config_stored_by_an_old_checkpoint_still_loads(tmp_path):
    from kimi.checkpoint import config_changes

    old = FIXTURES / "config_a916084.yaml"
    now = load_config(CONFIGS / "debug.yaml", OLD_RUN)
    assert config_from_dict(yaml.safe_load(old.read_text())) == now
    # Resuming it with the same settings reports no change (a renamed field is no spurious difference) ...
    (tmp_path / "config.yaml").write_text(old.read_text())
    assert config_changes(tmp_path, now) == []
    # ... and a real change is still seen.
    assert config_changes(tmp_path, load_config(CONFIGS / "debug.yaml", [*OLD_RUN, "--optim.lr=0.001"])) == [
        "optim.lr 0.003 -> 0.001"
    ]


def test_recompute_switches_may_change_on_resume(tmp_path):
    """They choose what backward keeps or rebuilds, not the model: a resume reports the change, not refuses it."""
    from kimi.checkpoint import config_changes

    before = load_config(CONFIGS / "debug.yaml", OLD_RUN)
    (tmp_path / "config.yaml").write_text(before.to_yaml())
    kv, moe = before.model.attention.recompute_kv, before.model.moe.recompute
    flipped = [f"--attention.recompute_kv={not kv}", f"--moe.recompute={not moe}"]
    assert config_changes(tmp_path, load_config(CONFIGS / "debug.yaml", [*OLD_RUN, *flipped])) == [
        f"model.attention.recompute_kv {kv} -> {not kv}",
        f"model.moe.recompute {moe} -> {not moe}",
    ]


@pytest.mark.parametrize(
    "build, needle",
    [
        (lambda: KimiConfig(n_layer="four"), "model.n_layer='four' should be an integer"),
        (lambda: KimiConfig(moe={"top_k": "two"}), "model.moe.top_k='two' should be an integer"),
        (lambda: MoEConfig(top_kk=2), "unknown config key 'moe.top_kk'; did you mean 'top_k'?"),
        (lambda: OptimConfig(lr="fast"), "optim.lr='fast' should be a number"),
        (lambda: TrainConfig(compile="maybe"), "train.compile='maybe' should be true or false"),
        (lambda: DeepSpeedConfig(zero_stage=3), "parallel.deepspeed.zero_stage=3 is not supported"),
        (lambda: ParallelConfig(timeout_s=0), "parallel.timeout_s=0.0 must be a number of seconds > 0"),
    ],
    ids=["model", "nested-dict", "unknown-key", "optim", "train", "deepspeed", "timeout"],
)
def test_sections_built_in_python_raise_one_line_config_errors(build, needle):
    with pytest.raises(ConfigError) as e:
        build()
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_command_line_text_reads_as_the_fields_type():
    cfg = load_config(
        None,
        [
            "--model.n_layer=3",
            "--optim.lr=1e-3",
            "--data.shard_tokens=5e7",
            "--optim.betas=0.8,0.9",
            "--logging.run_name=123",
            "--logging.experiment=1:30",  # text, not YAML 1.1's base-60 integer 90
            "--logging.tracking_uri=none",
            "--attention.q_lora_rank=null",
            "--train.resume=None",
        ],
    )
    assert (cfg.model.n_layer, cfg.optim.lr, cfg.data.shard_tokens, cfg.optim.betas) == (
        3,
        1e-3,
        50_000_000,
        (0.8, 0.9),
    )
    assert cfg.logging.run_name == "123" and cfg.logging.experiment == "1:30"
    assert cfg.logging.tracking_uri is None and cfg.model.attention.q_lora_rank is None and cfg.train.resume is None
    for word, value in {
        "true": True,
        "yes": True,
        "on": True,
        "1": True,
        "false": False,
        "no": False,
        "0": False,
    }.items():
        assert load_config(None, [f"--train.compile={word}"]).train.compile is value, word
    with pytest.raises(ConfigError, match="model.n_layer=True should be an integer"):  # not 1
        load_config(None, ["--model.n_layer=true"])
    with pytest.raises(ConfigError, match=r"optim.betas=\[0.8\] should be a list of 2 entries"):
        load_config(None, ["--optim.betas=[0.8]"])


def test_deepspeed_fields_live_in_their_own_section_and_the_old_spelling_still_reads(tmp_path):
    new = load_config(None, ["--parallel.deepspeed.zero_stage=2", "--parallel.deepspeed.config=ds.json"])
    assert new.parallel.deepspeed == DeepSpeedConfig(zero_stage=2, config="ds.json")
    assert "zero_stage" not in new.to_dict()["parallel"]  # stored in the new place only
    old = load_config(write(tmp_path, "parallel:\n  zero_stage: 2\n"), ["--parallel.deepspeed_config=ds.json"])
    assert old == new
    assert config_from_dict({"parallel": {"zero_stage": 2, "deepspeed_config": "ds.json"}}) == new
    # An error names the key as it was spelled.
    with pytest.raises(ConfigError, match=r"^parallel.zero_stage=3 is not supported"):
        load_config(None, ["--parallel.zero_stage=3"])
    with pytest.raises(ConfigError, match=r"^parallel.deepspeed.zero_stage=3 is not supported"):
        load_config(None, ["--parallel.deepspeed.zero_stage=3"])


def test_config_help_lists_every_field_with_type_default_and_doc():
    text = config_help()
    lines = text.splitlines()
    n = 0
    for name, cls in sections():
        short = {"model.attention": "attention", "model.moe": "moe"}.get(name, name)
        assert any(ln.startswith(f"{short}") and ln.endswith(cls.__doc__.splitlines()[0]) for ln in lines), name
        default = cls()
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(getattr(default, f.name)):
                continue
            doc = field_docs(cls).get(f.name, "")
            assert doc, f"{name}.{f.name} has no comment beside it (its --help text)"
            row = next((ln for ln in lines if ln.split()[:1] == [f"--{short}.{f.name}"]), None)
            assert row is not None, f"--{short}.{f.name}"
            shown = yaml.safe_load(row.split("(default ", 1)[1].split(")  ", 1)[0])
            want = f.default_factory() if f.default is dataclasses.MISSING else f.default  # data.mix: a list
            want = list(want) if isinstance(want, tuple) else want
            assert shown == want and row.endswith(doc), row
            n += 1
    assert n > 80


def test_merge_and_flatten_dicts():
    base = {"a": {"b": 1, "c": 2}, "d": 3}
    assert merge_dicts(base, {"a": {"c": 9}, "e": {"f": 1}}) == {"a": {"b": 1, "c": 9}, "d": 3, "e": {"f": 1}}
    assert base == {"a": {"b": 1, "c": 2}, "d": 3}  # untouched
    assert flatten_dict({"a": {"b": {"c": 1}, "d": None}, "e": (1, 2)}) == {"a.b.c": 1, "a.d": None, "e": (1, 2)}
    assert flatten_dict({"x": 1}, "p") == {"p.x": 1}


def test_readme_use_it_reads_what_the_quickstart_writes():
    """README's generate/evaluate/mlflow lines open the directory launch/quickstart.sh (its first command)
    trains into, and that is configs/quickstart.yaml's train.out_dir too."""
    root = CONFIGS.parent
    out = re.search(r"^OUT=\$\{OUT:-(\S+)\}$", (root / "launch" / "quickstart.sh").read_text(), re.M).group(1)
    assert load_config(CONFIGS / "quickstart.yaml").train.out_dir == out
    use_it = (root / "README.md").read_text().split("## Use it", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    dirs = [a or b for a, b in re.findall(r"--checkpoint (\S+)|sqlite:///(\S+)/mlflow\.db", use_it)]
    assert len(dirs) == 3 and set(dirs) == {out}, dirs


@pytest.mark.parametrize("name", ["gpt2", "byte", "tiktoken:/some/k2/tiktoken.model", "hf:~/tok/tokenizer.json"])
def test_tokenizer_names_that_exist_load(name):
    assert load_config(None, [f"--data.tokenizer_name={name}"]).data.tokenizer_name == name


@pytest.mark.parametrize("name", ["llama", "tiktoken:", "hf:", "sentencepiece:/x.model", "GPT2"])
def test_an_unknown_tokenizer_name_is_refused_at_load(name):
    """`--data.tokenizer_name=llama` used to train and write checkpoints that `generate` then refused."""
    with pytest.raises(ConfigError, match=rf"data.tokenizer_name='{re.escape(name)}' is not a tokenizer; use gpt2,"):
        load_config(None, {"data": {"tokenizer_name": name}})  # (on the command line, YAML reads `hf:` as a map)


def test_config_tokenizer_names_are_the_data_layers():
    """The config layer cannot import kimi.data; its copy of the built-in names must not drift."""
    from kimi.config.sections import FILE_TOKENIZER_KINDS, TOKENIZER_NAMES
    from kimi.data.tokenizer import TOKENIZERS
    from kimi.data.tokenizer_files import FILE_KINDS

    assert set(TOKENIZER_NAMES) == set(TOKENIZERS) and set(FILE_TOKENIZER_KINDS) == set(FILE_KINDS)


def test_async_checkpoint_with_deepspeed_is_refused_in_one_line():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["--train.async_checkpoint=true", "--parallel.engine=deepspeed"])
    needle = "train.async_checkpoint=true is not supported by parallel.engine=deepspeed"
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["--train.profile_steps=5:2"], "train.profile_steps='5:2' should be A:B"),
        (["--train.profile_steps=abc"], "train.profile_steps='abc' should be A:B"),
        (["--train.profile_steps=0:3"], "with 1 <= A <= B"),
        (["--train.memory_snapshot=true"], "train.memory_snapshot=true records over train.profile_steps"),
    ],
    ids=["reversed", "not-numbers", "step-0", "snapshot-without-window"],
)
def test_bad_profile_steps_are_refused_in_one_line(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_profile_steps_window():
    assert load_config(None, ["--train.profile_steps=3:5"]).train.profile_window() == (3, 5)
    assert load_config(None, ["--train.profile_steps=4:4"]).train.profile_window() == (4, 4)
    assert load_config(None, []).train.profile_window() is None
