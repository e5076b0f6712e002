"""data.mix: the config's forms and refusals, and which windows a mixture reads (kimi/data/mixture.py)."""

import numpy as np
import pytest
import torch

from kimi.config import ConfigError, load_config
from kimi.data.dataset import BatchIterator, DataError
from kimi.data.mixture import MixtureDataset, build_data
from tests.unit.test_data import make_split


def _cfg(*mix: str, **kw):
    return load_config(None, [f"--data.mix={','.join(mix)}", "--model.vocab_size=512", *kw.get("extra", [])])


@pytest.fixture
def roots(tmp_path):
    """Three prepared datasets whose tokens say which one they came from (a: 0-99, b: 100-199, c: 200-299)."""
    out = []
    for i, name in enumerate("abc"):
        tokens = 100 * i + np.random.default_rng(i).integers(0, 100, 3000 + 500 * i)
        for split in ("train", "val"):
            make_split(tmp_path / name / split, tokens, 900, vocab_size=512, corpus=name, split=split)
        out.append(tmp_path / name)
    return out


def _mix(roots, weights=(0.6, 0.3, 0.1), seed=3):
    cfg = _cfg(*(f"{r}:{w}" for r, w in zip(roots, weights)))
    return build_data(cfg.data, 16, 512, seed)


# ----------------------------------------------------------------------------- config


def test_cli_and_yaml_forms_agree(tmp_path):
    cli = _cfg("/d/web:0.7", "/d/code/:0.3").data.mix
    yaml_form = load_config(None, {"data": {"mix": [{"path": "/d/web", "weight": 0.7},
                                                    {"path": "/d/code/", "weight": 0.3}]}}).data.mix  # fmt: skip
    assert cli == yaml_form
    assert [(m.path, m.weight, m.name) for m in cli] == [("/d/web", 0.7, "web"), ("/d/code/", 0.3, "code")]
    assert load_config(None, {}).data.mix == []  # default: today's single dataset


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--data.mix=/d/a:0,/d/b:1"], "data.mix weight 0.0 of '/d/a' must be a finite number > 0"),
        (["--data.mix=/d/a:-2"], "data.mix weight -2.0 of '/d/a' must be a finite number > 0"),
        (["--data.mix=/d/a:inf"], "data.mix weight inf of '/d/a' must be a finite number > 0"),
        (["--data.mix=/d/a:nan"], "data.mix weight nan of '/d/a' must be a finite number > 0"),
        (["--data.mix=/x/a:1,/y/a:1"], "data.mix names ['a'] more than once"),
        (["--data.mix=/d/a"], "data.mix entry '/d/a' should be PATH:WEIGHT"),
        (["--data.mix=/d/a:1", "--data.dataset=/d/b"], "data.mix and data.dataset='/d/b' both name the training data"),
    ],
)
def test_bad_mix_is_one_line(args, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, args)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_bad_sources_are_one_line(roots, tmp_path):
    short = make_split(tmp_path / "short" / "train", np.arange(10), 900, vocab_size=512, corpus="s")
    with pytest.raises(DataError, match=r"^data.mix source 'short': .* fewer than block_size\+1"):
        build_data(_cfg(f"{roots[0]}:1", f"{short.parent}:1").data, 16, 512, 0)
    other = make_split(tmp_path / "bytes" / "train", np.arange(100, 400), 900, vocab_size=512, corpus="o")
    (other / "manifest.json").write_text((other / "manifest.json").read_text().replace('"gpt2"', '"byte"'))
    with pytest.raises(DataError, match=r"^data.mix sources were tokenised differently \(a: gpt2, bytes: byte\)"):
        build_data(_cfg(f"{roots[0]}:1", f"{other.parent}:1").data, 16, 512, 0)


# ----------------------------------------------------------------------------- which windows


def _source(x):  # each test source's tokens lie in its own hundred
    return (x[:, 0] // 100).tolist()


def test_windows_come_from_their_sources_and_are_deterministic(roots):
    ds = _mix(roots)
    assert isinstance(ds, MixtureDataset) and ds.names == ["a", "b", "c"]
    x, y = ds.get_batch(5, 0, 64)
    assert x.shape == (64, 16) and torch.equal(x[:, 1:], y[:, :-1])
    assert ((x // 100) == (x[:, :1] // 100)).all()  # a window never mixes two sources
    assert np.bincount(_source(x), minlength=3).tolist() == ds.source_counts(5, 64)
    x2, _ = _mix(roots).get_batch(5, 0, 64)  # rebuilt: the same windows
    assert torch.equal(x, x2)
    assert not torch.equal(x, ds.get_batch(6, 0, 64)[0])


@pytest.mark.parametrize("world,micro", [(2, 4), (4, 2)])
def test_rank_slices_concatenate_to_world_one(roots, world, micro):
    ds = _mix(roots)
    one = BatchIterator(ds, 16, 16)
    ranks = [BatchIterator(ds, 16, micro, dp_rank=r, dp_world=world) for r in range(world)]
    for _ in range(3):
        (whole, _), *_ = one.next_step()
        parts = torch.cat([x for it in ranks for x, _ in it.next_step()])
        assert torch.equal(whole, parts)


def test_fractions_over_1000_steps_match_the_weights(roots):
    ds, weights = _mix(roots), np.array([0.6, 0.3, 0.1])
    counts = np.sum([ds.source_counts(s, 32) for s in range(1, 1001)], axis=0)
    frac = counts / counts.sum()
    assert np.abs(frac - weights).max() < 0.01, frac


def test_changed_mixture_resumes_and_says_so(roots):
    old = BatchIterator(_mix(roots), 8, 8)
    old.next_step(), old.next_step()
    new = BatchIterator(_mix(roots[:2], weights=(0.5, 0.5)), 8, 8)
    new.load_state_dict(old.state_dict())
    assert new.step == 2
    assert new.mixture_change == "data mixture changed on resume: a:0.6, b:0.3, c:0.1 -> a:0.5, b:0.5"
    same = BatchIterator(_mix(roots), 8, 8)
    same.load_state_dict(old.state_dict())
    assert same.mixture_change is None
    with pytest.raises(DataError, match="different dataset"):  # a single dataset still must not change
        BatchIterator(build_data(_cfg().data, 16, 512, 3), 8, 8).load_state_dict(old.state_dict())
