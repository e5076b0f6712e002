"""The streamed hold-out (`TailSplit`) against the in-memory rule (`split_tail`) it must equal."""

from __future__ import annotations

import random

from kimi.data.holdout import TailSplit, split_tail


def _corpus(rng: random.Random) -> list[list[str]]:
    """Parts of documents: empty ones, ones without line breaks, long and short, some parts empty."""

    def doc() -> str:
        lines = ["".join(rng.choice("ab c") for _ in range(rng.randint(0, 30))) for _ in range(rng.randint(0, 6))]
        return "\n".join(lines)

    return [[doc() for _ in range(rng.randint(0, 5))] for _ in range(rng.randint(1, 5))]


def test_streamed_split_equals_split_tail():
    for seed in range(500):
        rng = random.Random(seed)
        parts = _corpus(rng)
        fraction = rng.choice([0.0, 0.05, 0.2, 0.5, 0.9, 1.0])
        split = TailSplit([lambda p=p: iter(p) for p in parts], fraction)
        want = split_tail([d for p in parts for d in p], fraction)
        assert (list(split.train()), list(split.val())) == want, f"seed {seed}: {parts} at {fraction}"


def test_each_split_reads_only_the_parts_it_needs():
    parts = [["a" * 100], ["b\n" * 50], ["c" * 10]]
    reads = []

    def reader(i):
        return lambda: (reads.append(i), iter(parts[i]))[1]

    split = TailSplit([reader(i) for i in range(3)], 0.06)  # want = 12: the last part and 2 chars before it
    assert split.total_chars == 210 and reads == [0, 1, 2]  # the counting pass
    reads.clear()
    assert list(split.train()) == ["a" * 100, "b\n" * 48 + "b"] and reads == [0, 1]
    reads.clear()
    assert list(split.val()) == ["b\n", "c" * 10] and reads == [1, 2]
    assert (list(split.train()), list(split.val())) == split_tail([d for p in parts for d in p], 0.06)
