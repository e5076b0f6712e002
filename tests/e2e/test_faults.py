"""Faults in a real `python -m kimi.train` process, and nothing lost or silent:

- a NaN/inf loss (optim.lr=1e6 really diverges): `train.nonfinite=stop` ends with one line and exit code
  4; `skip` drops the update and logs the count, then stops; `latest` stays on a finite checkpoint;
- a skipped step leaves weights, optimizer state and router biases exactly as they were; mid-run, the
  next step trains as a fresh process resumed there would (FSDP2 and DeepSpeed); the skip counters
  survive a resume; a NaN token on the Triton router is skipped too;
- a NaN on one of 2 ranks (FSDP2 + EP) is skipped by both, and the run trains on;
- SIGTERM / SIGUSR1 mid-run: exit 3, a checkpoint at the step it stopped, and the resume reproduces the
  uninterrupted run bit for bit, with every metrics row exactly once; the launchers' requeue file
  (KIMI_REQUEUE_FILE) is written on that save and cleared when a process starts.
"""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kimi.config import load_config
from kimi.engine import read_model_state as load_model_state
from kimi.train import REQUEUE_EXIT_CODE, train
from kimi.trainer.nonfinite import NONFINITE_EXIT_CODE
from kimi.trainer.preemption import Preemption

ROOT = Path(__file__).resolve().parents[2]
DEBUG = ROOT / "configs" / "debug.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
BASE = ["--config", "configs/debug.yaml", "--logging.mlflow=false", "--train.eval_interval=0"]


def _cli(out: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "kimi.train", *BASE, f"--train.out_dir={out}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _latest_step(out: Path) -> int:
    return json.loads((out / "checkpoints" / "latest" / "meta.json").read_text())["step"]


def _assert_finite_checkpoint(out: Path) -> None:
    state = load_model_state(out / "checkpoints" / "latest")[1]
    for k, v in state.items():
        if torch.is_tensor(v) and v.is_floating_point():
            assert torch.isfinite(v).all(), k


def _error_line(res: subprocess.CompletedProcess) -> str:
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-3000:]
    return lines[0]


# ----------------------------------------------------------------------------- NaN / inf


def test_nonfinite_stop_is_one_line_and_latest_stays_good(tmp_path):
    out = tmp_path / "run"
    res = _cli(out, "--optim.lr=1e6", "--train.max_steps=8", "--train.ckpt_interval=1")
    assert res.returncode == NONFINITE_EXIT_CODE, res.stdout[-2000:] + res.stderr[-2000:]
    line = _error_line(res)
    bad = len(_rows(out)) + 1  # the step that stopped the run is neither logged nor saved
    assert re.search(rf"step {bad}: the (loss|gradient norm) is (nan|inf)", line), line
    assert "stopped before applying it (train.nonfinite=stop)" in line and "lower --optim.lr" in line, line
    assert f"checkpoints/latest is still step_{bad - 1:06d}" in line, line
    assert 1 < bad < 8 and _latest_step(out) == bad - 1
    _assert_finite_checkpoint(out)


def test_nonfinite_skip_counts_then_stops(tmp_path):
    out = tmp_path / "run"
    args = ("--optim.lr=1e6", "--train.max_steps=12", "--train.ckpt_interval=1")
    res = _cli(out, *args, "--train.nonfinite=skip", "--train.max_nonfinite_skips=2")
    assert res.returncode == NONFINITE_EXIT_CODE, res.stdout[-2000:] + res.stderr[-2000:]
    line = _error_line(res)
    rows = _rows(out)
    skipped = [r for r in rows if r.get("nonfinite_skips")]
    # lr=1e6 breaks the model for good: every step from the first NaN on is skipped, and the 3rd stops.
    assert [r["nonfinite_skips"] for r in skipped] == [1, 2] and skipped[-1] == rows[-1], rows
    assert all(not math.isfinite(r["loss"]) or not math.isfinite(r["grad_norm"]) for r in skipped)
    bad = rows[-1]["step"] + 1
    assert re.search(rf"step {bad}: the (loss|gradient norm) is (nan|inf)", line), line
    assert ", 3 such steps in a row; stopped before applying it (train.max_nonfinite_skips=2)" in line, line
    assert res.stdout.count("update skipped") == 2
    # A skipped step changes no weight: its checkpoint (ckpt_interval=1) holds the last good ones.
    assert _latest_step(out) == bad - 1
    _assert_finite_checkpoint(out)


def test_nonfinite_weights_are_never_saved(tmp_path):
    """A finite step can still overflow the weights (here weight decay's p *= 1 - lr * wd): the final
    save refuses them rather than make them `latest`."""
    out = tmp_path / "run"
    res = _cli(out, "--optim.weight_decay=1e45", "--train.max_steps=1")
    assert res.returncode == NONFINITE_EXIT_CODE, res.stdout[-2000:] + res.stderr[-2000:]
    line = _error_line(res)
    assert "step 1: the weights hold NaN/inf, not saving them" in line and "no checkpoint was written" in line
    assert not (out / "checkpoints" / "latest").exists()


def _nan_at(step: int | tuple[int, ...], micro_per_step: int):
    """A forward hook that turns the embedding output NaN during training step `step` (or each of several;
    counted from 1 = the first step this process trains): a real NaN that goes through the model, the
    loss, the gradients and the loop's check."""
    steps = (step,) if isinstance(step, int) else step
    calls = {"n": 0}

    def hook(module, args, output):
        if module.training:
            calls["n"] += 1
            if (calls["n"] - 1) // micro_per_step + 1 in steps:
                return output * float("nan")
        return output

    return hook


class PreStepHookCount:
    """Trainer hooks that count, per step, how often the engine ran its pre-step hooks (where the router-bias
    update lives): one more hook registered through `engine.register_step_pre_hook`, as the trainer does.
    `per_step[i]` is the count of this process's (i + 1)-th step: 1 on an applied step, 0 on a skipped one.
    `on_build` is chained (fault injection)."""

    def __init__(self, on_build=None) -> None:
        self.per_step: list[int] = []
        self._n, self._on_build = 0, on_build

    def hooks(self):
        from kimi.train import Hooks

        return Hooks(on_build=self._build, on_step=self._step)

    def _build(self, trainer) -> None:
        trainer.engine.register_step_pre_hook(self._count)
        if self._on_build:
            self._on_build(trainer)

    def _count(self) -> None:
        self._n += 1

    def _step(self, step: int, row: dict) -> None:
        self.per_step.append(self._n)
        self._n = 0


# `python -m kimi.train` with a NaN in the embedding output of training step NAN_STEP (a forward hook set
# on the built trainer): the real entry point, argument parsing and exit code, with a real NaN in the model.
_NAN_CLI = """
import sys
import kimi.train as kt
from tests.e2e.test_faults import _nan_at
build = kt.Trainer.__init__
def with_nan(self, *args, **kwargs):
    build(self, *args, **kwargs)
    self.raw_model.embed_tokens.register_forward_hook(_nan_at(int(sys.argv[1]), int(sys.argv[2])))
kt.Trainer.__init__ = with_nan
kt.main(sys.argv[3:])
"""


def _cli_with_nan(out: Path, step: int, micro_per_step: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", _NAN_CLI, str(step), str(micro_per_step), *BASE, f"--train.out_dir={out}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def test_nan_token_is_skipped_by_the_triton_router(tmp_path):
    """moe.kernels=triton (the GPU default under auto): a NaN token at step 2 of 4 is skipped like on the
    torch path, and steps 3-4 train on. The fused router once gave an all-NaN row the expert id E_PAD,
    which does not exist: 'index 4 is out of bounds' on one process, SIGSEGV under EP=2."""
    out = tmp_path / "run"
    args = ("--moe.kernels=triton", "--train.nonfinite=skip", "--train.max_steps=4")
    res = _cli_with_nan(out, 2, 2, *args)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and not math.isfinite(rows[1]["loss"]), rows
    assert [r.get("nonfinite_skips") for r in rows] == [None, 1, 1, 1]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows[2:]), rows
    assert res.stdout.count("update skipped") == 1
    _assert_finite_checkpoint(out)


def test_skipped_step_leaves_the_state_untouched(tmp_path):
    """With NaN injected into step 3 of 3, the step-3 checkpoint must equal the step-2 checkpoint of the
    same run without the NaN (weights, Muon/AdamW state, router biases), with the data one step on."""
    from kimi.train import Hooks

    def cfg(out, *extra):
        return load_config(DEBUG, [f"--train.out_dir={out}", "--logging.mlflow=false", *BASE[3:], *extra])

    ref, nan = tmp_path / "ref", tmp_path / "nan"
    train(cfg(ref, "--train.max_steps=3", "--train.ckpt_interval=1", "--train.keep_last=3"))

    def nan_at_step_3(trainer):
        trainer.raw_model.embed_tokens.register_forward_hook(_nan_at(3, micro_per_step=2))

    row = train(cfg(nan, "--train.max_steps=3", "--train.nonfinite=skip"), hooks=Hooks(on_build=nan_at_step_3))
    assert row["nonfinite_skips"] == 1 and row["loss"] != row["loss"]
    a, b = _full_state(ref / "checkpoints" / "step_000002"), _full_state(nan / "checkpoints" / "step_000003")
    assert a.keys() == b.keys() and any("expert_bias" in k for k in a) and any(k.startswith("optim.") for k in a)
    for k in (k for k in a if not k.startswith("optim.param_groups")):  # whose lr follows the schedule
        # weights, router biases, Muon momenta, AdamW moments and step counts
        assert torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k], k
    state_a, state_b = (torch.load(d / "checkpoints" / "step_000003" / "train_state.pt") for d in (ref, nan))
    for k in ("data", "scheduler"):  # the data and the lr schedule still moved on past the skipped step
        assert state_a[k] == state_b[k], k


# debug's max attention logits are ~0.2: tau 0.05 makes QK-clip act on every applied step.
MID_RUN = ("--train.max_steps=5", "--train.max_nonfinite_skips=1", "--train.ckpt_interval=1", "--train.keep_last=5")
MID_RUN += ("--optim.qk_clip_tau=0.05",)
AFTER_SKIP = ("loss", "grad_norm", "max_attn_logit", "qk_clipped_heads", "expert_imbalance", "router_entropy")


def _nan_in_head_at(steps: tuple[int, ...]):
    """NaN in the lm_head output at these steps of this process: loss and gradients go NaN while the
    step's attention maxima and routing counts stay real, so a skip that kept them would show."""

    def add(trainer):
        trainer.raw_model.lm_head.register_forward_hook(_nan_at(steps, micro_per_step=2))

    return add


@pytest.mark.parametrize("engine", ["fsdp2", "deepspeed", "deepspeed-zero2"])
def test_skip_mid_run_then_trains_on(tmp_path, engine):
    """NaN at steps 2 and 4 of 5 (one process; DeepSpeed ZeRO-1 and -2): each is skipped, the next trains.
    - a finite step resets the streak: max_nonfinite_skips=1 must not stop the run at step 4;
    - a skipped step moves no weight or router bias, QK-clip included (tau 0.05 clips every real step);
    - what follows a skip equals a fresh process resumed from the skipped step's checkpoint: no routing
      counts (bias update, entropy) and no attention maxima (QK-clip) of the skipped forward leak into it;
    - the engine runs its pre-step hooks (the router-bias update) once per applied step and never on a
      skipped one, and the applied steps log real routing stats. DeepSpeed once ran them once per ZeRO
      param group (3 per step): the later calls read zeroed counts and logged imbalance 0 and entropy NaN.
    """
    from kimi.train import Hooks

    name, _, zero = engine.partition("-")
    stage = ["--parallel.zero_stage=2"] if zero else []

    def cfg(out):
        return load_config(DEBUG, [f"--train.out_dir={out}", *BASE[2:], "--train.nonfinite=skip",
                                   f"--parallel.engine={name}", *stage, *MID_RUN])  # fmt: skip

    run, ref = tmp_path / "run", tmp_path / "resumed"
    count = PreStepHookCount(on_build=_nan_in_head_at((2, 4)))
    row = train(cfg(run), hooks=count.hooks())
    rows = _rows(run)
    assert row["step"] == 5 and [r.get("nonfinite_skips") for r in rows] == [None, 1, 1, 2, 2], rows
    assert [math.isfinite(r["loss"]) for r in rows] == [True, False, True, False, True], rows
    assert count.per_step == [1, 0, 1, 0, 1]
    for r in rows[::2]:  # the applied steps: QK-clip acts, and the routing stats are those of real counts
        assert r["qk_clipped_heads"] > 0 and r["expert_imbalance"] >= 1 and r["router_entropy"] > 0, r

    def model(step):
        return load_model_state(run / "checkpoints" / f"step_{step:06d}")[1]

    for skipped in (2, 4):
        before, after = model(skipped - 1), model(skipped)
        assert before.keys() == after.keys() and any("expert_bias" in k for k in after)
        assert all(torch.equal(before[k], after[k]) for k in before), skipped

    (ref / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / "step_000002", ref / "checkpoints" / "step_000002")
    (ref / "checkpoints" / "latest").symlink_to("step_000002")
    train(cfg(ref), hooks=Hooks(on_build=_nan_in_head_at((2,))))  # resumed at 3: its 2nd step is step 4
    resumed = _rows(ref)
    assert [r["step"] for r in resumed] == [3, 4, 5]
    for a, b in zip(rows[2:], resumed):  # repr: NaN == NaN, and a skipped step's row has no routing stats
        assert {k: repr(a.get(k)) for k in AFTER_SKIP} == {k: repr(b.get(k)) for k in AFTER_SKIP}, (a, b)
    final, final_ref = model(5), load_model_state(ref / "checkpoints" / "step_000005")[1]
    assert all(torch.equal(final[k], final_ref[k]) for k in final)


def _train_with_nan(out: Path, steps: tuple[int, ...], *args: str) -> dict:
    """train() in this process (one rank, accumulation 2) with NaN at these steps of this process."""
    from kimi.train import Hooks

    def add_nan(trainer):
        trainer.raw_model.embed_tokens.register_forward_hook(_nan_at(steps, micro_per_step=2))

    cfg = load_config(DEBUG, [f"--train.out_dir={out}", *BASE[2:], "--train.nonfinite=skip", *args])
    return train(cfg, hooks=Hooks(on_build=add_nan))


def test_skip_counters_survive_a_resume(tmp_path):
    """The skip streak and total are saved with the checkpoint: 2 NaN steps in a row (2 and 3) end the
    first run; resumed, a 3rd NaN in a row (step 4) exceeds max_nonfinite_skips=2 and stops the run, as it
    would have without the restart. Another resume with no NaN keeps the total (2) in its rows."""
    from kimi.trainer.nonfinite import NonFiniteError

    out = tmp_path / "run"
    args = ("--train.max_nonfinite_skips=2", "--train.ckpt_interval=1", "--train.keep_last=5")
    assert _train_with_nan(out, (2, 3), "--train.max_steps=3", *args)["nonfinite_skips"] == 2
    saved = out / "checkpoints" / "step_000003"
    with pytest.raises(NonFiniteError, match="step 4: the loss is nan, 3 such steps in a row"):
        _train_with_nan(out, (1,), "--train.max_steps=5", *args)
    assert _latest_step(out) == 3 and (out / "checkpoints" / "latest").resolve() == saved.resolve()
    row = _train_with_nan(out, (), "--train.max_steps=5", *args)
    assert row["step"] == 5 and math.isfinite(row["loss"]) and row["nonfinite_skips"] == 2
    assert [r.get("nonfinite_skips") for r in _rows(out)] == [None, 1, 2, 2, 2]


def _nan_on_rank1(rank: int, world: int, out: str, kernels: str) -> tuple[int, float]:
    from kimi.train import Hooks

    def nan_on_rank1(trainer):
        if rank == 1:  # accumulation 1 on 2 ranks: one forward per step
            trainer.raw_model.embed_tokens.register_forward_hook(_nan_at(2, micro_per_step=1))

    args = ["--train.max_steps=3", "--train.nonfinite=skip", "--parallel.ep=2", f"--moe.kernels={kernels}"]
    cfg = load_config(DEBUG, [f"--train.out_dir={out}", *BASE[2:], *args])
    row = train(cfg, hooks=Hooks(on_build=nan_on_rank1))
    return row["nonfinite_skips"], row["loss"]


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_nan_on_one_rank_is_skipped_by_all(tmp_path, kernels):
    """Under FSDP2 + EP on 2 ranks, a NaN on rank 1 only: both ranks skip step 2 (a rank that applied it
    alone would hang or split the model), then train on; the log shows the skip once. With the Triton
    router, rank 1 once sent its NaN tokens to a nonexistent expert and died of SIGSEGV."""
    from tests.dist_utils import run_distributed

    out = tmp_path / "run"
    results = run_distributed(_nan_on_rank1, 2, args=(str(out), kernels), timeout=300)
    assert [skips for skips, _ in results] == [1, 1] and all(math.isfinite(loss) for _, loss in results)
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and not math.isfinite(rows[1]["loss"])
    assert [r.get("nonfinite_skips") for r in rows] == [None, 1, 1]
    _assert_finite_checkpoint(out)


def _full_state(ckpt: Path) -> dict:
    """A DCP checkpoint's {"model": ..., "optim": ...} as one flat dict of tensors and numbers."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(ckpt, ckpt / "full.pt")
    flat = {}

    def walk(prefix, obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}.{i}", v)
        else:
            flat[prefix] = obj

    walk("", torch.load(ckpt / "full.pt", weights_only=False))
    return flat


# ----------------------------------------------------------------------------- signals

SIGNAL_STEPS = 10
SIGNAL_ARGS = (f"--train.max_steps={SIGNAL_STEPS}",)


def _train_one_thread(out: Path) -> None:
    """train() in this process with the thread count of the CLI runs (OMP_NUM_THREADS=1), so that its
    numbers are comparable bit for bit with theirs (intra-op threads change summation order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(load_config(DEBUG, [f"--train.out_dir={out}", *BASE[2:], *SIGNAL_ARGS]))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("sig") / "ref"
    _train_one_thread(out)
    return _rows(out)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["TERM", "USR1"])
def test_signal_checkpoints_and_resumes_bit_exact(tmp_path, uninterrupted, sig):
    """A real process, a real signal once a few steps are logged (the handler is set by then)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "kimi.train", *BASE, f"--train.out_dir={out}", *SIGNAL_ARGS]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics, deadline = out / "metrics.jsonl", time.monotonic() + 240
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no training step logged in 240 s"
            time.sleep(0.05)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == REQUEUE_EXIT_CODE, stdout[-2000:] + stderr[-2000:]
    stopped = [r["step"] for r in _rows(out)]
    assert stopped == list(range(1, len(stopped) + 1)) and len(stopped) < SIGNAL_STEPS
    assert _latest_step(out) == stopped[-1]
    assert f"checkpoint at step {stopped[-1]} written" in stdout

    _train_one_thread(out)  # resumes from checkpoints/latest (the CLI's resume is tested elsewhere)
    rows = _rows(out)
    assert [r["step"] for r in rows] == list(range(1, SIGNAL_STEPS + 1))  # none missing, none twice
    assert [r["loss"] for r in rows] == [r["loss"] for r in uninterrupted]  # bit for bit
    assert [r["grad_norm"] for r in rows] == [r["grad_norm"] for r in uninterrupted]


def test_requeue_mark_is_written_on_a_save_and_cleared_at_start(tmp_path, monkeypatch):
    """The launchers' KIMI_REQUEUE_FILE: written by a process that exits 3 (its step in it), removed when a
    process starts (a mark from an earlier torchrun round must not make a later crash look like a save)."""
    from kimi.train import main

    mark = tmp_path / "requeue"
    monkeypatch.setenv("KIMI_REQUEUE_FILE", str(mark))
    mark.write_text("step 7\n")  # an earlier round's
    main([*BASE, f"--train.out_dir={tmp_path / 'done'}", "--train.max_steps=2"])
    assert not mark.exists()
    monkeypatch.setattr("kimi.train.Preemption", lambda stop_after=None: Preemption(stop_after=2))  # as a signal
    with pytest.raises(SystemExit) as e:
        main([*BASE, f"--train.out_dir={tmp_path / 'preempted'}", "--train.max_steps=4"])
    assert e.value.code == REQUEUE_EXIT_CODE and mark.read_text() == "step 2\n"


def test_fatal_mark_is_written_on_an_error_a_restart_would_repeat(tmp_path, monkeypatch):
    """slurm/common.sh's KIMI_FATAL_FILE: a bad config (exit 2) names it, so the job is not requeued as a
    crash; a process that starts clears it."""
    from kimi.train import main

    fatal = tmp_path / "fatal"
    monkeypatch.setenv("KIMI_FATAL_FILE", str(fatal))
    with pytest.raises(SystemExit) as e:
        main([*BASE, f"--train.out_dir={tmp_path / 'bad'}", "--model.n_layerz=3"])
    assert e.value.code == 2 and fatal.read_text().startswith("exit 2: ") and "n_layerz" in fatal.read_text()
    main([*BASE, f"--train.out_dir={tmp_path / 'good'}", "--train.max_steps=1"])
    assert not fatal.exists()
