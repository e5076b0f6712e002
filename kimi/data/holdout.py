"""Holding out the last part of a corpus for validation, with the text in memory or streamed.

    train, val = split_tail(docs, 0.05)             # a list in memory: the rule, stated as code
    split = TailSplit([lambda: iter_texts(f) for f in files], 0.05)
    split.train(), split.val()                      # the same documents, streamed in bounded memory

`TailSplit` reads its parts once to count characters (per part), then `train()` streams up to the cut and
stops, and `val()` skips the parts that lie wholly before it. Both yield exactly what `split_tail` returns
for the concatenated documents (tests/unit/test_holdout.py checks it on random corpora), so a dataset
prepared before streaming keeps its tokens and its fingerprint.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator


def split_tail(docs: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """Hold out the last `fraction` of the characters, cut at a line break, keeping document boundaries."""
    want = int(sum(map(len, docs)) * fraction)
    train, val = list(docs), []
    while train and want > 0:
        last = train.pop()
        if len(last) <= want:
            val.insert(0, last)
            want -= len(last)
            continue
        cut = last.rfind("\n", 0, len(last) - want)
        if cut <= 0 and train:  # no line break to cut at: the document boundary before it is the next best
            val.insert(0, last)
            break
        cut = cut if cut > 0 else len(last) - want
        train.append(last[:cut].rstrip())
        val.insert(0, last[cut:].lstrip())
        break
    return train, val


class TailSplit:
    """`split_tail` over the documents of `parts` (callables, each returning a fresh iterable), streamed.

    A document that ends `after` characters before the end of the corpus is held out (wholly) when
    `after + len(doc) <= want`, not at all when `after >= want`, and cut as `split_tail` cuts otherwise."""

    def __init__(self, parts: list[Callable[[], Iterable[str]]], fraction: float):
        self.parts, self.fraction = parts, fraction

    @functools.cached_property
    def _sizes(self) -> list[tuple[int, int]]:
        """(characters, documents) of each part: the one counting pass."""
        sizes = []
        for part in self.parts:
            chars = docs = 0
            for doc in part():
                chars, docs = chars + len(doc), docs + 1
            sizes.append((chars, docs))
        return sizes

    @property
    def total_chars(self) -> int:
        return sum(chars for chars, _ in self._sizes)

    def _docs(self, want_val: bool) -> Iterator[str]:
        total = self.total_chars
        want = int(total * self.fraction)
        end = index = 0  # characters up to the end of the current part; documents before it
        for part, (size, count) in zip(self.parts, self._sizes):
            start, end = end, end + size
            wholly_train = total - end >= want  # even its last document ends at least `want` before the end
            if not want_val and total - start < want:
                return  # this part and every later one is held out wholly
            if wholly_train and not want_val:
                yield from part()
            if wholly_train:
                index += count
                continue
            pos = start
            for doc in part():
                after = total - pos - len(doc)
                pos, index = pos + len(doc), index + 1
                if after >= want:
                    if not want_val:
                        yield doc
                    continue
                if after + len(doc) > want:
                    yield from self._cut(doc, want - after, index > 1, want_val)
                elif want_val:
                    yield doc
                if not want_val:
                    return  # the rest is held out: train reads no further

    @staticmethod
    def _cut(doc: str, want: int, has_before: bool, want_val: bool) -> Iterator[str]:
        cut = doc.rfind("\n", 0, len(doc) - want)
        if cut <= 0 and has_before:
            if want_val:
                yield doc
            return
        cut = cut if cut > 0 else len(doc) - want
        yield doc[cut:].lstrip() if want_val else doc[:cut].rstrip()

    def train(self) -> Iterator[str]:
        return self._docs(want_val=False)

    def val(self) -> Iterator[str]:
        return self._docs(want_val=True)
