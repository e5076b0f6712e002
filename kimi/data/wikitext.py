"""MediaWiki XML dump -> plain-text articles.

A deliberately small cleaner (no full wikitext parser): it keeps prose, headings and list items, turns
links into their visible text, and drops what is not prose: templates, references, tables, comments,
<math>, files/images, categories, interlanguage links and the link/citation sections at the end of an
article. Nested constructs are peeled innermost-first, so `{{a|{{b}}}}` and `[[File:x|caption [[y]]]]` go
cleanly. Good enough for a language-modelling corpus, not a faithful renderer.
"""

from __future__ import annotations

import html
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import IO

_DROP_NAMESPACES = {"file", "image", "media", "category"}
_INTERLANGUAGE = re.compile(r"^:?[a-z]{2,3}(-[a-z]+)*:")
_DROP_SECTIONS = {
    "references", "external links", "see also", "further reading", "notes", "bibliography", "sources",
    "citations", "notes and references", "footnotes",
}  # fmt: skip

_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref\b[^>]*?/>|<ref[^>]*>.*?</ref\s*>", re.S | re.I)
_DROP_ELEMENTS = re.compile(r"<(math|gallery|timeline|score|syntaxhighlight|source|imagemap)\b.*?</\1\s*>", re.S | re.I)
_TAG = re.compile(r"</?[a-zA-Z][^>]*?/?>")
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_EXTERNAL = re.compile(r"\[(?:https?|ftp)://[^\s\]]*(?:\s+([^\]]*))?\]")
_EMPHASIS = re.compile(r"'{2,}")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")
_MAGIC = re.compile(r"__[A-Z]+__")


def _peel(pattern: re.Pattern, repl, text: str, max_depth: int = 20) -> str:
    """Apply an innermost-construct substitution until nothing matches (nesting depth <= max_depth)."""
    for _ in range(max_depth):
        text, n = pattern.subn(repl, text)
        if n == 0:
            break
    return text


def _template_text(m: re.Match) -> str:
    """Most templates are metadata (infoboxes, citations, maintenance tags) and go; a few wrap prose."""
    name, *params = [p.strip() for p in m.group(0)[2:-2].split("|")]
    name = name.lower()
    positional = [p for p in params if "=" not in p]
    if (name in ("lang", "transl", "nowrap") or name.startswith("lang-")) and positional:
        return positional[-1]
    if name in ("convert", "cvt") and len(positional) >= 2:
        return f"{positional[0]} {positional[1]}"
    return ""


def _link_text(m: re.Match) -> str:
    target, _, label = m.group(1).partition("|")
    namespace = target.split(":", 1)[0].strip().lower() if ":" in target else ""
    if namespace.lstrip(":") in _DROP_NAMESPACES or (not label and _INTERLANGUAGE.match(target)):
        return ""
    return (label.rsplit("|", 1)[-1] if label else target).strip()


def _drop_tables(lines: list[str]) -> list[str]:
    out, depth = [], 0
    for line in lines:
        s = line.lstrip()
        if s.startswith("{|"):
            depth += 1
        elif depth and s.startswith("|}"):
            depth -= 1
        elif depth == 0:
            out.append(line)
    return out


def wiki_to_text(markup: str) -> str:
    """Plain text of one article's wikitext."""
    text = _COMMENT.sub("", markup)
    text = _REF.sub("", text)
    text = _DROP_ELEMENTS.sub("", text)
    text = _peel(_TEMPLATE, _template_text, text)
    text = _peel(_LINK, _link_text, text)
    text = _EXTERNAL.sub(lambda m: m.group(1) or "", text)
    text = _TAG.sub("", text)
    text = _MAGIC.sub("", _EMPHASIS.sub("", text))
    out: list[str] = []
    skipping = None  # heading level of a dropped section, while inside it
    for line in _drop_tables(text.split("\n")):
        heading = _HEADING.match(line.strip())
        if heading:
            level, title = len(heading.group(1)), heading.group(2).strip()
            if skipping is not None and level > skipping:
                continue
            skipping = level if title.lower() in _DROP_SECTIONS else None
            line = title if skipping is None else ""
        elif skipping is not None:
            continue
        line = html.unescape(re.sub(r"^[*#:;]+\s*", "", line.strip())).replace("\xa0", " ")
        if line.startswith(("|", "!", "{", "}", "[[File:", "[[Image:")):  # debris of unbalanced markup
            continue
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip()


def iter_articles(xml_file: IO[bytes]) -> Iterator[tuple[str, str]]:
    """(title, plain text) of each main-namespace, non-redirect page of a MediaWiki XML dump."""
    for _, elem in ET.iterparse(xml_file, events=("end",)):
        if elem.tag.rsplit("}", 1)[-1] != "page":
            continue
        fields = {child.tag.rsplit("}", 1)[-1]: child for child in elem}
        ns = fields.get("ns")
        redirect = "redirect" in fields
        revision = fields.get("revision")
        body = None
        if revision is not None:
            body = next((c.text for c in revision if c.tag.rsplit("}", 1)[-1] == "text"), None)
        if ns is not None and ns.text == "0" and not redirect and body:
            text = wiki_to_text(body)
            if text:
                yield fields["title"].text or "", text
        elem.clear()
