"""How a config section is built and checked: pydantic dataclasses with extra="forbid", text from YAML and
the command line read as each field's type, and pydantic's multi-line errors as one ConfigError line.
Also the dict helpers every layer shares (merge_dicts, flatten_dict)."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from typing import Any

import pydantic
import yaml
from pydantic_core import PydanticCustomError


class ConfigError(ValueError):
    """A config problem, phrased as one line that says what is wrong and how to fix it."""


# ----------------------------------------------------------------------------- how a section is built

# extra="forbid": an unknown key is an error, never ignored. coerce_numbers_to_str: `run_name: 123` is "123".
_PYDANTIC = pydantic.ConfigDict(extra="forbid", coerce_numbers_to_str=True)


def _read_text(cls: type, value: Any, info: pydantic.ValidationInfo) -> Any:
    """What YAML and the command line leave as text, read as the field's type before pydantic checks it:
    'none' -> None for an optional field, '5e7' -> 50000000 for an int, '0.9,0.95' -> a tuple. And no bool
    where a number belongs: pydantic's lax mode would read `n_layer: true` as 1."""
    tp = cls.__pydantic_fields__[info.field_name].annotation
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    base = next(a for a in args if a is not type(None))
    if isinstance(value, str):
        if type(None) in args and value.lower() in ("none", "null"):
            return None
        if typing.get_origin(base) is tuple:
            try:
                return yaml.safe_load(value if value.startswith("[") else f"[{value}]")
            except yaml.YAMLError:
                return value
        if base is int:
            try:
                return int(value)
            except ValueError:
                return int(float(value)) if _is_integral(value) else value
    if isinstance(value, bool) and base in (int, float):
        raise PydanticCustomError(f"{base.__name__}_type", "a bool where a number belongs")
    return value


def _is_integral(text: str) -> bool:
    try:
        return float(text).is_integer()
    except ValueError:
        return False


def section(name: str) -> typing.Callable[[type], type]:
    """Make `cls` a config section: a pydantic dataclass whose direct construction (`KimiConfig(n_layer="four")`)
    raises a one-line ConfigError naming `name.key`, as building it from a YAML tree does."""

    def wrap(cls: type) -> type:
        cls._read_text = pydantic.field_validator("*", mode="before")(_read_text)
        cls = pydantic.dataclasses.dataclass(cls, config=_PYDANTIC)
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            try:
                init(self, *args, **kwargs)
            except pydantic.ValidationError as e:
                raise config_error(e, cls, name) from None

        cls.__init__ = __init__
        return cls

    return wrap


# Top-level sections that live inside another one.
_ALIASES = {"attention": ("model", "attention"), "moe": ("model", "moe")}
# pydantic's error types -> what the value should have been.
_EXPECTED = {"int": "an integer", "float": "a number", "bool": "true or false", "string": "a string"}


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _suggest(key: str, valid: typing.Iterable[str]) -> str:
    near = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"; did you mean '{near[0]}'?" if near else f"; valid keys: {', '.join(sorted(valid))}"


def config_error(err: pydantic.ValidationError, root: type, prefix: str = "") -> ConfigError:
    """pydantic's multi-line ValidationError for section `root` as one ConfigError line: the dotted key
    (under `prefix`), the bad value and what was expected; a ConfigError raised by a section's own checks
    comes back as it was."""
    e = err.errors(include_url=False)[0]
    if isinstance((e.get("ctx") or {}).get("error"), ConfigError):
        return e["ctx"]["error"]
    keys, owner, tp = [], root, root
    for part in e["loc"]:  # the field names, down to the first non-section (a tuple's index)
        if not (isinstance(part, str) and dataclasses.is_dataclass(tp)):
            break
        owner, fields = tp, tp.__pydantic_fields__
        keys.append(part)
        tp = fields[part].annotation if part in fields else None
    key = ".".join([prefix, *keys] if prefix else keys) or root.__name__
    value, kind = e["input"], e["type"]
    if kind == "unexpected_keyword_argument":
        valid = list(owner.__pydantic_fields__)
        if owner is root and not prefix:  # the whole tree (Config): its keys are sections
            return ConfigError(f"unknown config section '{keys[-1]}'{_suggest(keys[-1], valid + list(_ALIASES))}")
        return ConfigError(f"unknown config key '{key}'{_suggest(keys[-1], valid)}")
    if kind in ("dataclass_type", "dataclass_args_type"):
        return ConfigError(f"{key} should be a mapping of {getattr(tp, '__name__', 'config')} fields, got {value!r}")
    if typing.get_origin(tp) is tuple and kind in ("tuple_type", "missing", "too_short", "too_long"):
        n = len(typing.get_args(tp))
        return ConfigError(f"{key}={value!r} should be a list of {n} entries like {_plain(_default(owner, keys[-1]))}")
    expected = _EXPECTED.get(kind.split("_")[0])
    if expected:
        return ConfigError(f"{key}={value!r} should be {expected}")
    return ConfigError(f"{key}={value!r}: {e['msg']}")


def _default(cls: type, name: str) -> Any:
    f = cls.__pydantic_fields__[name]
    return f.default_factory() if f.default_factory else f.default


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build section `cls` from a (nested) dict, checking every key and type; `prefix` names it in errors."""
    try:
        return _adapter(cls).validate_python(data)
    except pydantic.ValidationError as e:
        raise config_error(e, cls, prefix) from None


@functools.cache
def _adapter(cls: type) -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(cls)


def merge_dicts(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """A copy of `base` with `over` merged in: nested dicts merge key by key, anything else in `over` wins."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def unflatten_dict(flat: dict[str, Any]) -> dict[str, Any]:
    """{"model.moe.top_k": 2} -> {"model": {"moe": {"top_k": 2}}}: flatten_dict's inverse."""
    out: dict[str, Any] = {}
    for dotted, value in flat.items():
        *path, last = dotted.split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def flatten_dict(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"moe": {"top_k": 2}}} -> {"model.moe.top_k": 2}; a non-empty `prefix` goes before each key."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(flatten_dict(v, key) if isinstance(v, dict) else {key: v})
    return out
