"""Resuming and reading DeepSpeed checkpoints when the config changes between runs (issue 17), through the
real training loop (kimi.train.train) on gloo CPU ranks, debug model.

- Activation checkpointing wraps each Block (checkpoint_wrapper), which puts `_checkpoint_wrapped_module.`
  into parameter names. The expert files hold plain model keys whatever the run used, so a checkpoint
  written with it on reads on one process (kimi.load_model, convert) and resumes with it off, and the
  other way round; the resumed losses are the uninterrupted run's, bit for bit (same layout, same
  reduction order; checkpointing only recomputes the forward).
- `optim.grad_clip` changed on resume applies under DeepSpeed as under FSDP2: ZeRO's load_checkpoint
  restores the clipping value it saved, and the engine puts this run's back.
"""

import json
from pathlib import Path

import pytest
import torch

from kimi.config import load_config
from tests.dist_utils import run_distributed

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4


def _cfg(out, *extra):
    return load_config(
        ROOT / "configs" / "debug.yaml",
        [f"--train.out_dir={out}", "--logging.mlflow=false", f"--train.max_steps={STEPS}", "--train.eval_interval=0",
         "--parallel.engine=deepspeed", *extra],
    )  # fmt: skip


def _losses(out) -> list[float]:
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # no step missing or repeated
    return [r["loss"] for r in rows]


def _ac_runs(rank, world, tmp):
    from kimi.train import train

    ep = ("--parallel.ep=2",)
    train(_cfg(f"{tmp}/ref", *ep))  # uninterrupted, activation checkpointing off
    for first, then in ((True, False), (False, True)):
        out = f"{tmp}/ac_{first:d}{then:d}"
        train(_cfg(out, *ep, f"--train.activation_checkpointing={first}"), stop_after=STEPS // 2)
        train(_cfg(out, *ep, f"--train.activation_checkpointing={then}"))


@pytest.fixture(scope="module")
def ac_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ac")
    run_distributed(_ac_runs, 2, args=(str(tmp),), timeout=600)
    return tmp


def test_activation_checkpointing_toggled_on_resume_reproduces_the_run(ac_runs):
    ref = _losses(ac_runs / "ref")
    assert ref[0] != ref[-1]  # it trained
    for run in ("ac_10", "ac_01"):
        assert _losses(ac_runs / run) == ref, run  # the resumed half too: experts loaded into the right params


def test_checkpoint_written_with_activation_checkpointing_reads_on_one_process(ac_runs, tmp_path):
    from kimi import load_model
    from kimi.convert import main as convert_main

    ckpt = ac_runs / "ac_01" / "checkpoints" / "latest"  # written by the run with checkpointing on
    for f in ckpt.glob("experts_ep*.pt"):
        assert not any("_checkpoint_wrapped_module" in k for k in torch.load(f, weights_only=True)), f
    a, ref = load_model(ckpt), load_model(ac_runs / "ref")
    idx = torch.randint(0, ref.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a(idx).logits, ref(idx).logits)  # all experts of both EP ranks, in place
    assert convert_main(["--to-hf", str(ckpt), str(tmp_path / "hf")]) in (0, None)


def test_expert_files_from_before_the_fix_still_read(ac_runs, tmp_path):
    """Checkpoints written before expert names were plain carry the wrapper's prefix in their expert keys."""
    import shutil

    from kimi import load_model
    from kimi.checkpoint.store import META, checksums

    old = tmp_path / "step_old"
    shutil.copytree((ac_runs / "ac_01" / "checkpoints" / "latest").resolve(), old)
    for f in old.glob("experts_ep*.pt"):
        state = {k.replace(".ffn.", "._checkpoint_wrapped_module.ffn."): v for k, v in torch.load(f).items()}
        assert all("_checkpoint_wrapped_module" in k for k in state)  # the old spelling, as issue 17 saw it
        torch.save(state, f)
    meta = json.loads((old / META).read_text())
    meta.pop("meta_sha256")  # checkpoints from before the fix had no seal on meta.json either
    (old / META).write_text(json.dumps({**meta, "checksums": checksums(old)}))
    got, ref = load_model(old).state_dict(), load_model(ac_runs / "ref").state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def _clip_runs(rank, world, tmp):
    """Each engine on one process: 2 steps clipped at 1.0, then resumed with optim.grad_clip=0.25."""
    from kimi.train import Hooks, train

    res = {}
    for engine in ("fsdp2", "deepspeed"):
        out, built = f"{tmp}/{engine}", []
        train(_cfg(out, f"--parallel.engine={engine}", "--optim.grad_clip=1.0"), stop_after=STEPS // 2)
        train(_cfg(out, f"--parallel.engine={engine}", "--optim.grad_clip=0.25"), hooks=Hooks(on_build=built.append))
        (trainer,) = built
        clip = trainer.engine.ds.optimizer.clip_grad if engine == "deepspeed" else None
        res[engine] = (_losses(out), [json.loads(r)["grad_norm"] for r in Path(out, "metrics.jsonl").open()], clip)
    return res


def test_grad_clip_changed_on_resume_applies_under_deepspeed(tmp_path):
    (res,) = run_distributed(_clip_runs, 1, args=(str(tmp_path),), init_pg=False, timeout=300)
    (ref, ref_norms, _), (ds, ds_norms, clip) = res["fsdp2"], res["deepspeed"]
    assert clip == 0.25  # the value ZeRO clips with after load_checkpoint: this run's, not the checkpoint's
    assert min(ref_norms[STEPS // 2 :]) > 1.0  # both clipping values bite on the resumed steps
    # What the optimizer does with the clipped gradients after the resume is the FSDP2 engine's (which
    # applies the new value). 1e-5 relative: the engines' parity tolerance (tests/e2e/test_train_deepspeed.py).
    assert ds == pytest.approx(ref, rel=1e-5) and ds_norms == pytest.approx(ref_norms, rel=1e-5)
