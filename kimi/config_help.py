"""`config_help()`: every field of the config tree as `--section.key  TYPE  (default X)  doc`, for `--help`.

The docs are the one-line comments beside the fields in kimi/config.py, read from the source with tokenize,
so the comment stays the single place a field is described.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import tokenize

import yaml

from kimi.config.build import _ALIASES, _plain
from kimi.config.sections import Config

# Sections shown under their short name (`--moe.top_k`, as configs/*.yaml spell them).
_SHORT = {".".join(path): alias for alias, path in _ALIASES.items()}


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: the comment at the end of its line} for dataclass `cls`."""
    names, docs = {f.name for f in dataclasses.fields(cls)}, {}
    skip = (tokenize.INDENT, tokenize.DEDENT, tokenize.NEWLINE, tokenize.NL)
    lines: dict[int, list[tokenize.TokenInfo]] = {}
    for tok in tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline):
        if tok.type not in skip:
            lines.setdefault(tok.start[0], []).append(tok)
    for toks in lines.values():  # a field's line: name ':' annotation ['=' default] '# doc'
        if len(toks) > 2 and toks[0].string in names and toks[1].string == ":" and toks[-1].type == tokenize.COMMENT:
            docs[toks[0].string] = toks[-1].string.lstrip("#").strip()
    return docs


def sections(cls: type = Config, path: str = "") -> list[tuple[str, type]]:
    """(dotted name, class) of every section under `cls`, depth first."""
    out = []
    for f in dataclasses.fields(cls):
        tp = cls.__pydantic_fields__[f.name].annotation
        if dataclasses.is_dataclass(tp):
            name = f"{path}.{f.name}" if path else f.name
            out += [(name, tp), *sections(tp, name)]
    return out


def _default(f: dataclasses.Field) -> str:
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return yaml.safe_dump(_plain(value), default_flow_style=True).strip().removesuffix("\n...")


def config_help() -> str:
    """Every config field, grouped by section under the section's one-line description."""
    out = ["config (precedence: --section.key=value > --config YAML > defaults):"]
    for name, cls in sections():
        rows = [
            (
                f"--{_SHORT.get(name, name)}.{f.name}",
                str(f.type),
                f"(default {_default(f)})",
                field_docs(cls).get(f.name, ""),
            )
            for f in dataclasses.fields(cls)
            if not dataclasses.is_dataclass(cls.__pydantic_fields__[f.name].annotation)
        ]
        also = f" (= {name})" if name in _SHORT else ""
        out += ["", f"{_SHORT.get(name, name)}{also}: {inspect.getdoc(cls).splitlines()[0]}"]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        out += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3] for r in rows]
    return "\n".join(out)
