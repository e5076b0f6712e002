"""The checkpoint directory's ordering: steps by number, never as strings."""

from kimi.checkpoint import CheckpointStore, complete_steps


def _step(root, n, complete=True):
    p = root / f"step_{n:06d}"
    p.mkdir()
    if complete:
        (p / "meta.json").write_text("{}")
    return p


def test_steps_past_999999_sort_by_number(tmp_path):
    """`step_1000000` sorts before `step_999998` as a string; `latest` fallback and rotation must not."""
    for n in (999998, 1000000, 999999):
        _step(tmp_path, n)
    _step(tmp_path, 1000001, complete=False)
    assert [p.name for p in complete_steps(tmp_path)] == ["step_999998", "step_999999", "step_1000000"]
    store = CheckpointStore(tmp_path, keep_last=2)
    assert store.latest().name == "step_1000000"  # no `latest` link: the newest complete step
    assert [p.name for p in store.incomplete_steps()] == ["step_1000001"]
    store._rotate()
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_1000000", "step_1000001"]  # the 2 newest
