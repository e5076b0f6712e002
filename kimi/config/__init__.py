"""The one typed config tree.

    Config
      model: KimiConfig           n_layer, n_head, n_embd, vocab_size, block_size, ...
        attention: AttentionConfig  MLA (or plain MHA for the dense baseline)
          rope_scaling: RopeScalingConfig  YaRN context extension
        moe: MoEConfig              routed + shared experts, aux-loss-free routing
      optim: OptimConfig          Muon/AdamW, QK-clip, schedule
      train: TrainConfig          steps, batch, eval, checkpoints
      data: DataConfig            dataset, tokenizer
      parallel: ParallelConfig    dp_replicate x dp_shard, ep, engine
        deepspeed: DeepSpeedConfig  ZeRO stage, user JSON
      logging: LoggingConfig      metrics.jsonl, MLflow

Filled from defaults < YAML (`configs/*.yaml`) < command line (`--section.key=value`).
`attention` and `moe` are also accepted as top-level sections (short for `model.attention`,
`model.moe`), so `--moe.num_experts=16` works. Each component receives only its own sub-config.

The sections are pydantic dataclasses: plain dataclasses to the code that reads them (`cfg.train.max_steps`,
`dataclasses.asdict`, equality), checked and converted by pydantic wherever they are built, from a YAML
tree or as `KimiConfig(n_layer=4)`. Unknown keys and wrong types raise `ConfigError`, one line naming the
key and the nearest valid one. The one-line comment beside each field is its `--help` text (kimi/config_help.py).

build.py     how a section is built and checked; one-line errors; merge_dicts / flatten_dict
sections.py  the sections (one pydantic dataclass per component)
load.py      defaults < YAML < command line; aliases and moved keys
"""

from kimi.config.build import (
    ConfigError,
    config_error,
    flatten_dict,
    from_dict,
    merge_dicts,
    section,
    unflatten_dict,
)
from kimi.config.load import config_from_dict, load_config, load_yaml, parse_overrides
from kimi.config.sections import (
    AttentionConfig,
    Config,
    DataConfig,
    DeepSpeedConfig,
    KimiConfig,
    LoggingConfig,
    MoEConfig,
    OptimConfig,
    ParallelConfig,
    RopeScalingConfig,
    TrainConfig,
)

__all__ = [
    "AttentionConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DeepSpeedConfig",
    "KimiConfig",
    "LoggingConfig",
    "MoEConfig",
    "OptimConfig",
    "ParallelConfig",
    "RopeScalingConfig",
    "TrainConfig",
    "config_error",
    "config_from_dict",
    "flatten_dict",
    "from_dict",
    "load_config",
    "load_yaml",
    "merge_dicts",
    "parse_overrides",
    "section",
    "unflatten_dict",
]
