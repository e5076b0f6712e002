"""Filling the tree: defaults < YAML file < command line (`--section.key=value`), with the aliases
(`moe:` / `attention:` as top-level sections) and keys that moved (old spellings still read)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from kimi.config.build import _ALIASES, ConfigError, flatten_dict, from_dict, merge_dicts
from kimi.config.sections import Config

# Keys that moved, old spelling -> new. The old one still reads (command line, YAML, configs inside old
# checkpoints), and errors name the key as the user spelled it.
_MOVED = {
    "parallel.zero_stage": "parallel.deepspeed.zero_stage",
    "parallel.deepspeed_config": "parallel.deepspeed.config",
}


class _Loader(yaml.SafeLoader):
    """yaml.safe_load, less YAML 1.1's base-60 numbers: `3:5` reads as the text "3:5" (train.profile_steps=A:B),
    not as the integer 185, in files and on the command line alike."""


_BASE60 = re.compile(r"^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$")
_Loader.yaml_implicit_resolvers = {  # the first resolver that matches wins: this one, before int and float's
    c: ([("tag:yaml.org,2002:str", _BASE60)] if c in "+-0123456789" else []) + list(rs)
    for c, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader)


def _nested(dotted: str, value: Any) -> dict[str, Any]:
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    if path[0] in _ALIASES:
        path = list(_ALIASES[path[0]]) + path[1:]
    node = tree
    for p in path[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"'{'.'.join(path)}': '{p}' is a value, not a section")
    node[path[-1]] = value


def _normalise(tree: dict[str, Any]) -> dict[str, Any]:
    """Move top-level `attention:` / `moe:` sections under `model:`, and moved keys to their new place
    (where a tree holds both spellings, the new one wins)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out = merge_dicts(out, {_ALIASES[k][0]: {_ALIASES[k][1]: v}} if k in _ALIASES else {k: v})
    for old, new in _MOVED.items():
        section, key = old.split(".")
        if isinstance(out.get(section), dict) and key in out[section]:
            out[section] = dict(out[section])  # the caller's tree stays as it was
            out = merge_dicts(_nested(new, out[section].pop(key)), out)
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist; the shipped ones are in configs/")
    try:
        data = _yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' should hold a mapping of sections (model:, train:, ...)")
    return data


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`['--moe.num_experts=16', '--train.compile', 'true']` -> nested dict (values as YAML reads them)."""
    tree: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"cannot read argument '{arg}': overrides look like --section.key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
            else:
                value = "true"  # a bare flag: --train.compile
        _set_path(tree, key.split("."), _yaml(value) if value != "" else "")
        i += 1
    return tree


def _build(*trees: dict[str, Any]) -> Config:
    """Defaults < trees[0] < trees[1] < ..., validated; errors name moved keys as the trees spell them."""
    merged: dict[str, Any] = {}
    for tree in trees:
        merged = merge_dicts(merged, _normalise(tree))
    try:
        return from_dict(Config, merged).validate()
    except ConfigError as e:
        msg = str(e)
        for old, new in _MOVED.items():
            if any(old in flatten_dict(tree) for tree in trees):
                msg = msg.replace(new, old)
        raise ConfigError(msg) from None


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Defaults < YAML file < overrides (a list of `--section.key=value` or a nested dict)."""
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    return _build(load_yaml(path) if path else {}, overrides or {})


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild a Config from `Config.to_dict()` (e.g. the copy stored in a checkpoint, old spellings included)."""
    return _build(tree)
