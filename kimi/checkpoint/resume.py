"""The trainer's checkpoints: the resume policy at the start of a run, and when to save during it.

    ckpt = Checkpointer(cfg, engine, states={"scheduler": ..., "data": ...}, say=rt.print)
    start = ckpt.load()                       # {"step": 0} for a fresh run, else the saved train state
    for step ...:
        ckpt.save(step, last=step == max_steps, force=preempted, val_loss=..., extra={...})
    ckpt.wait()                               # train.async_checkpoint: a save still being written (the
                                              # last one of a run, last or force, is waited for in save)

Resume policy (load): `train.resume` None resumes when OUT/checkpoints holds a step, True demands one,
False refuses one. A missing or dangling `latest`, or one naming a step without meta.json, falls back
to the newest complete step (said in one line); step directories that are all incomplete are never
trained over from step 0. The stored config is compared with this run's: fields that would change the parameters or the data stream refuse the resume
(FROZEN_ON_RESUME), the others are printed as `field old -> new` and this run's values hold, including
the optimizer's hyperparameters and the lr schedule's shape (`states` restore only positions).

The engine (kimi/engine/) writes and reads the model and optimizer inside the step directory; each entry
of `states` (anything with state_dict / load_state_dict) goes into train_state.pt under its name, the
format train_state.pt has always had ({"step", "scheduler", "data", "nonfinite", "mlflow_run_id", ...}); a
state newer than the format (NEWER_STATES) that an older checkpoint lacks keeps its fresh value; any
other missing state is refused.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Protocol

import yaml

from kimi.checkpoint.store import CheckpointError, CheckpointStore, _rank, read_meta
from kimi.config import ConfigError, config_from_dict, flatten_dict
from kimi.data.tokenizer_files import CHECKPOINT_DIR, TokenizerFileError, copy_tokenizer_files, tokenizer_files


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Writer(Protocol):
    """What an engine offers the checkpointer (kimi.engine.Engine)."""

    def write(self, tmp: Path) -> None: ...

    def write_async(self, tmp: Path, group: Any) -> Future: ...

    def read(self, path: Path) -> None: ...

    def checkpoint_meta(self) -> dict[str, Any]: ...


NEWER_STATES = {"nonfinite"}  # states newer than the format: an older checkpoint lacks them, they start fresh


class Checkpointer:
    def __init__(self, cfg, engine: Writer, states: dict[str, Stateful], say: Callable[[str], None] = print,
                 before_save: Callable[[int], None] | None = None):  # fmt: skip
        """`cfg`: the run's whole Config (its train section says where and when; the whole tree is stored
        and compared on resume). `before_save(step)` may raise to refuse a save (non-finite weights)."""
        t = cfg.train
        self.cfg, self.engine, self.states, self.say, self.before_save = cfg, engine, states, say, before_save
        self.store = CheckpointStore(Path(t.out_dir) / "checkpoints", t.keep_last, t.keep_best, cfg.parallel.timeout_s)
        self.interval, self.resume, self.background = t.ckpt_interval, t.resume, t.async_checkpoint
        # Per save: {"step", "blocked_s" (the loop held, the wait for the previous async save included),
        # "waited_s" (that wait alone), "hash_s" (sync saves: this rank hashing its share), "background_s"
        # (async saves: staged to published)}; for kimi.bench.
        self.timings: list[dict[str, float]] = []
        self._started = 0.0  # when the save in flight began (for its line once written)

    @property
    def dir(self) -> Path:
        return self.store.dir

    def latest(self) -> Path | None:
        return self.store.latest()

    # ------------------------------------------------------------------ load
    def load(self) -> dict[str, Any]:
        """Collective. Resume when the policy says so: model and optimizer through the engine, then each
        of `states`; returns the train state ({"step": 0} when starting fresh)."""
        store, latest = self.store, self.store.latest()
        if latest is None:
            if self.resume:
                raise CheckpointError(f"--resume: no checkpoint under '{store.dir}'; drop --resume to start fresh")
            if store.incomplete_steps():  # never train from step 0 on top of checkpoints we cannot read
                raise CheckpointError(
                    f"'{store.dir}' holds step directories but none is complete (no meta.json): "
                    f"{', '.join(p.name for p in store.incomplete_steps())}; move them away or use another --out-dir"
                )
            return {"step": 0}
        if self.resume is False:
            raise CheckpointError(
                f"'{self.cfg.train.out_dir}' already holds a checkpoint ({latest.name}); "
                "use another --out-dir, or drop --train.resume=false to continue it"
            )
        if not store.link_ok():
            link = store.dir / "latest"
            why = (
                f"points to {link.resolve().name}, which has no meta.json (an interrupted or damaged save)"
                if link.exists()
                else "is missing or points to a deleted step"
            )
            self.say(f"'{link}' {why}; resuming from the newest complete checkpoint, {latest.name}")
        self._check_engine(latest)
        changes = config_changes(latest, self.cfg)  # raises CheckpointError where a change cannot work
        state, meta = store.load(latest, self.engine.read)
        for name, s in self.states.items():
            if name in state:
                s.load_state_dict(state[name])
            elif name not in NEWER_STATES:
                raise CheckpointError(f"'{latest}' holds no '{name}' state; it is damaged or not from kimi.train")
        self.say(f"resumed from {latest} (step {state['step']}, written at world size {meta.get('world_size')})")
        if changes:
            self.say("config differs from the checkpoint: " + ", ".join(changes))
        return state

    def _check_engine(self, step_dir: Path) -> None:
        """One clear line when a checkpoint was written by another engine (their layouts differ)."""
        wrote = read_meta(step_dir).get("engine", "fsdp2")  # checkpoints from before engines existed are FSDP2's
        ours = self.engine.checkpoint_meta()["engine"]
        if wrote != ours:
            raise CheckpointError(
                f"checkpoint '{step_dir}' was written by the {wrote} engine; resume it with --parallel.engine={wrote}"
            )

    # ------------------------------------------------------------------ save
    def due(self, step: int, last: bool = False, force: bool = False) -> bool:
        """The end of the run, every ckpt_interval steps, and when a signal asks to stop."""
        return last or force or bool(self.interval and step % self.interval == 0)

    def save(self, step: int, last: bool = False, force: bool = False, val_loss: float | None = None,
             extra: dict[str, Any] | None = None) -> Path | None:  # fmt: skip
        """Collective. Write step `step` when it is due (see `due`); `extra` joins the train state and meta
        (e.g. the MLflow run id). Returns the step directory once it is complete, or None when no save was due
        or (train.async_checkpoint) it is still being written in the background; the last save of a run
        (`last` or `force`) is always waited for."""
        if not self.due(step, last, force):
            return None
        if self.before_save is not None:
            self.before_save(step)
        t0 = time.perf_counter()
        self.wait()  # the save in flight (train.async_checkpoint) first: one .tmp directory at a time
        waited = time.perf_counter() - t0
        extra = extra or {}
        train_state = {"step": step, **{k: s.state_dict() for k, s in self.states.items()}, **extra}
        meta = {"tokenizer": self.cfg.data.tokenizer_name, "val_loss": val_loss, **extra,
                **self.engine.checkpoint_meta()}  # fmt: skip
        if files := self._tokenizer_files():  # the checkpoint carries them: generate needs no flag, nor the path
            meta["tokenizer_files"] = files

        def copy_tokenizer(tmp: Path) -> None:
            if files and _rank() == 0:
                copy_tokenizer_files(self.cfg.data.tokenizer_name, tmp / CHECKPOINT_DIR, files)

        def write(tmp: Path) -> None:
            self.engine.write(tmp)
            copy_tokenizer(tmp)

        def write_async(tmp: Path, group: Any) -> Future:
            copy_tokenizer(tmp)  # small files: in the foreground, before the shards
            return self.engine.write_async(tmp, group)

        args = (train_state, self.cfg.to_yaml(), meta)
        if not self.background:
            path = self.store.save(step, write, *args)
            self._timed(step, t0, waited)["hash_s"] = self.store.hash_s
            self.say(f"checkpoint: step {step} -> {path} ({time.perf_counter() - t0:.1f}s)")
            return path
        self._started = time.perf_counter()
        self.store.save_async(step, write_async, *args)
        staged = self._timed(step, t0, waited)["blocked_s"] - waited
        self.say(f"checkpoint: step {step} staged in {staged:.2f}s, being written in the background")
        return self.wait() if last or force else None

    def wait(self) -> Path | None:
        """Collective: finish the async save in flight (its shards written, hashed, published as `latest`);
        its step directory, None when there was none. The trainer calls it at the end of a run too."""
        step = self.store.pending_step()
        path = self.store.wait()
        if path is not None:
            took = self.store.published_at - self._started
            self.timings[-1]["background_s"] = took
            self.say(f"checkpoint: step {step} -> {path} (written in the background in {took:.1f}s)")
        return path

    def _timed(self, step: int, t0: float, waited: float) -> dict[str, float]:
        self.timings.append({"step": step, "blocked_s": time.perf_counter() - t0, "waited_s": waited})
        return self.timings[-1]

    def _tokenizer_files(self) -> dict[str, str]:
        """{name: sha256} of a tiktoken:/hf: tokenizer's files; {} for built-in ones, or (said once per save)
        when the files have gone since the run started."""
        try:
            return tokenizer_files(self.cfg.data.tokenizer_name)
        except TokenizerFileError as e:
            self.say(f"checkpoint without its tokenizer files: {e}")
            return {}


# Fields a resumed run cannot change: the parameters' shapes and meaning, the optimizer state's layout, and
# the data stream's windows. (data.dataset is checked by the data stream's own identity, so a moved data
# directory still resumes.)
FROZEN_ON_RESUME = (
    "model.",
    "data.block_size",
    "data.tokenizer_name",
    "train.seed",
    "optim.name",
    "optim.expert_optimizer",
)
# ... except model fields that pick how the same math runs, or tune routing without changing shapes.
RESUMABLE_MODEL_FIELDS = (
    "model.loss_chunk_tokens",
    "model.moe.kernels",
    "model.moe.recompute",
    "model.attention.recompute_kv",
    "model.moe.bias_update_rate",
    "model.moe.seq_aux_loss_coef",
    "model.moe.aux_loss_coef",
)
_NOT_COMPARED = ("train.out_dir", "train.resume")  # where and how this invocation runs, not the run


def config_changes(step_dir: Path, cfg: Any) -> list[str]:
    """`field old -> new` for each config field where `cfg` (a kimi.config.Config) differs from the one
    stored in `step_dir`; CheckpointError (one line) when a field in FROZEN_ON_RESUME differs. Fields the
    stored config lacks (added to the code since) count as unchanged."""
    cfg_file = step_dir / "config.yaml"
    if not cfg_file.is_file():
        return []
    old = yaml.safe_load(cfg_file.read_text()) or {}
    try:
        old = config_from_dict(old).to_dict()  # defaults filled in, as this code reads it
    except ConfigError:
        pass  # a field since removed: compare what both know
    old_flat, new_flat = flatten_dict(old), flatten_dict(cfg.to_dict())
    changed = [k for k in new_flat if k in old_flat and old_flat[k] != new_flat[k] and k not in _NOT_COMPARED]
    frozen = [k for k in changed if k.startswith(FROZEN_ON_RESUME) and k not in RESUMABLE_MODEL_FIELDS]
    if frozen:
        what = ", ".join(f"{k} {old_flat[k]} -> {new_flat[k]}" for k in frozen)
        raise CheckpointError(
            f"cannot resume '{step_dir}' with a different config: {what} (the model, its optimizer state or "
            f"its data stream would change); drop the override, or start a new --out-dir"
        )
    return [f"{k} {old_flat[k]} -> {new_flat[k]}" for k in changed]
