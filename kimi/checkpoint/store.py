"""The checkpoint directory: atomic step directories, checksums, `latest`/`best` links, rotation.

This module knows directories and files, not formats: an engine (kimi/engine/) writes and reads the model
and optimizer state inside a step directory; `CheckpointStore` wraps that in the atomic sequence. The
resume policy (which step, what changed in the config, what to restore) is kimi/checkpoint/resume.py.

Layout, one directory per step:

    OUT/checkpoints/step_000400/   DCP shards of {"model", "optim"}, train_state.pt (scheduler, data
                                   position, QK-clip/routing extras), rng/rank_00000.pt ...,
                                   config.yaml, meta.json (step, tokenizer, git commit, world size, ...),
                                   tokenizer/ (a tiktoken:/hf: tokenizer's files; sha256 in meta.json)
    OUT/checkpoints/latest         symlink -> step_000400, replaced only once the step directory is complete
    OUT/checkpoints/best           symlink -> the step with the lowest validation loss (kept from rotation)

Atomicity: every rank writes into `step_000400.tmp/`; after a barrier every rank hashes its `share` of
the files (split by size, so each rank reads about 1/world of the bytes), rank 0 gathers the checksums
into meta.json, renames the directory to `step_000400/` (a POSIX rename of a directory is atomic) and
then swaps the `latest` symlink with `os.replace`. A kill at any moment leaves either the old `latest` or the
new one, never a half checkpoint behind a pointer (tests/e2e/test_checkpoint_faults.py kills a real run at
each of these points). Leftover `*.tmp` directories are removed at the next save. A save that fails
(e.g. a full disk) removes its `.tmp` directory and raises CheckpointError; `latest` is untouched.

Async saves (`save_async`): the caller is held only while the engine stages its state (a copy in host
memory) and the small files are written; the shards are written, hashed and published (the same sequence
as above, on a process group of its own so it never interleaves with the training step's collectives) in
a background thread. `wait()` finishes it; a new save waits for the one in flight first, so at most one
`.tmp` directory is being written and `latest` only ever moves to a complete, hashed step.

Integrity: meta.json lists the sha256 of every other file of the step, and its own (`meta_sha256`, over
the rest of it), so a damaged meta.json is blamed on itself; loading checks them (older checkpoints without
them still load). The step directories, not the link, are the truth: a missing or dangling `latest`, or one
naming a step without meta.json, means the newest complete step (one with meta.json).

Steps are ordered by their number, never as strings (step_1000000 comes after step_999999).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from kimi.files import git_state, sha256_file  # leaf helpers: checkpoints import neither data nor tracking

STEP_PREFIX = "step_"
META = "meta.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with a line saying why."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _gather(obj: Any, group: Any = None) -> list[Any]:
    """Collective (over `group`, default the world): every rank's `obj`, in rank order."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _agree(problem: str | None, group: Any = None) -> str | None:
    """Collective: the first rank's problem (None if every rank is fine), known to every rank, so all
    of them raise together instead of some waiting forever at the next barrier."""
    return next((p for p in _gather(problem, group) if p), None)


def _reason(e: BaseException) -> str:
    """The root cause of a failed write in a few words ('No space left on device'), found through
    DCP's per-rank failure wrappers and exception chains."""
    todo, seen = [e], set()
    while todo:
        x = todo.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.strerror:
            return x.strerror
        for f in getattr(x, "failures", {}).values():  # CheckpointException: {rank: exception or (exc, tb)}
            todo.extend(v for v in (f if isinstance(f, tuple) else (f,)) if isinstance(v, BaseException))
        todo.extend(v for v in (x.__cause__, x.__context__) if v is not None)
    text = str(e).strip()
    return text.splitlines()[-1][:200] if text else type(e).__name__


def _save_file(obj: Any, path: Path) -> None:
    """torch.save through Python's file API, so a full disk surfaces as OSError(ENOSPC), not as
    torch's 'file write failed' from inline_container.cc."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    path.write_bytes(buf.getbuffer())


def _pause_for_test(phase: str, step: int, out_dir: Path) -> None:
    """Test hook for tests/e2e/test_checkpoint_faults.py and test_restart.py: with
    KIMI_TEST_PAUSE_IN_SAVE=<phase>@<step>, the save of that step writes OUT/paused_in_save and sleeps at
    <phase>, so the test can send a real SIGKILL exactly there; `<phase>@<step>:<rank>` holds that rank
    only (the others go on into the save's next collective and wait there). Only in torchrun's first round
    (TORCHELASTIC_RESTART_COUNT 0): the workers it restarts save that step for real. The kill is real; the
    hook only holds the window open. Unset: a no-op."""
    where, _, only = os.environ.get("KIMI_TEST_PAUSE_IN_SAVE", "").partition(":")
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" or where != f"{phase}@{step}":
        return
    if not only or int(only) == _rank():
        (out_dir / "paused_in_save").write_text(phase)
        time.sleep(3600)


def pause_in_write(tmp: Path) -> None:
    """The same hook, phase `writing`, for an engine's writer to call once its shards are on disk and its
    index is not (inside the write: under `train.async_checkpoint`, in the background writer thread)."""
    _pause_for_test("writing", step_number(tmp.with_name(tmp.name.removesuffix(".tmp"))), tmp.parent.parent)


def _hash_files(step_dir: Path, files: list[Path]) -> dict[str, str]:
    """Threads: hashlib releases the GIL, so several shards hash at once."""
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(files)))) as pool:
        sums = list(pool.map(sha256_file, files))
    return {str(p.relative_to(step_dir)): h for p, h in zip(files, sums)}


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != META)


def checksums(step_dir: Path) -> dict[str, str]:
    """sha256 of every file in a step directory but meta.json (which holds them), by relative path."""
    return _hash_files(step_dir, _files(step_dir))


def share(files: list[Path], rank: int, world: int) -> list[Path]:
    """Rank `rank`'s share of `files` for hashing: the largest file first to the rank with the fewest bytes
    so far (ties to the lowest rank), so each rank reads about 1/world of the bytes whatever the mix of
    big shards and small files. Deterministic: every rank lists the same files and computes the same split."""
    load, mine = [0] * world, []
    for size, p in sorted(((p.stat().st_size, p) for p in files), key=lambda sp: (-sp[0], str(sp[1]))):
        r = load.index(min(load))
        load[r] += size
        if r == rank:
            mine.append(p)
    return mine


def step_number(step_dir: Path) -> int:
    """The step of a `step_NNNNNN` directory (-1 for a name that holds no number)."""
    digits = step_dir.name.removeprefix(STEP_PREFIX)
    return int(digits) if digits.isdigit() else -1


def step_dirs(ckpt_dir: Path) -> list[Path]:
    """Step directories that are not `.tmp`, oldest step first (by number, not by name)."""
    steps = (p for p in ckpt_dir.glob(f"{STEP_PREFIX}*") if p.is_dir() and not p.name.endswith(".tmp"))
    return sorted(steps, key=step_number)


def complete_steps(ckpt_dir: Path) -> list[Path]:
    """Finished step directories (renamed from .tmp, with meta.json), oldest first."""
    return [p for p in step_dirs(ckpt_dir) if (p / META).is_file()]


def _older_advice(step_dir: Path) -> str:
    older = [p for p in complete_steps(step_dir.parent) if step_number(p) < step_number(step_dir)]
    if not older:
        return "there is no older checkpoint next to it; start a new --out-dir"
    return (
        f"use the older checkpoint '{older[-1]}' (to resume a run from it, move '{step_dir.name}' out of "
        f"'{step_dir.parent}') or start a new --out-dir"
    )


def _meta_sha256(meta: dict[str, Any]) -> str:
    """meta.json's checksum of itself: a flipped digit in the checksums it lists is then blamed on meta.json,
    not on the file whose checksum it damaged."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def load_meta(step_dir: Path) -> dict[str, Any]:
    """A step's meta.json, checked: CheckpointError naming meta.json when it is missing, not JSON, or edited
    since it was written (its `meta_sha256`; older checkpoints without one are read as they are)."""
    f = step_dir / META
    if not f.is_file():
        raise CheckpointError(f"'{step_dir}' has no {META} (an interrupted save?); {_older_advice(step_dir)}")
    try:
        meta = json.loads(f.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"'{f}' is not valid JSON ({e}); {_older_advice(step_dir)}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"'{f}' is not a JSON object; {_older_advice(step_dir)}")
    if "meta_sha256" in meta and meta["meta_sha256"] != _meta_sha256(meta):
        raise CheckpointError(
            f"'{f}' is damaged (its contents differ from its own meta_sha256); {_older_advice(step_dir)}"
        )
    return meta


def verify(step_dir: Path, collective: bool = False) -> None:
    """Check the files of a step directory against the checksums in its meta.json; raise CheckpointError
    naming the first missing or corrupt file. `collective=True` (every rank calls it) splits the files
    between ranks, so the checkpoint is read once in all, not once per rank."""
    sums = load_meta(step_dir).get("checksums")
    required = ["train_state.pt", ".metadata"] if sums is None else sorted(sums)  # before checksums: presence
    rank, world = (_rank(), dist.get_world_size()) if collective and dist.is_initialized() else (0, 1)
    problem = None
    for name in required[rank::world]:
        f = step_dir / name
        if not f.is_file():
            problem = f"checkpoint file '{f}' is missing"
        elif sums is not None and sha256_file(f) != sums[name]:
            problem = f"checkpoint file '{f}' is corrupt (its sha256 differs from the one in {META})"
        if problem:
            break
    problem = _agree(problem) if collective else problem
    if problem:
        raise CheckpointError(f"{problem}; {_older_advice(step_dir)}")


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def resolve(path: str | Path) -> Path:
    """A checkpoint path given by a user: a step directory, a `latest`/`best` link, an `OUT/checkpoints`
    directory or a run's `OUT` directory (both meaning its latest step)."""
    p = Path(path)
    if p.name == "latest" and p.is_symlink() and not (p / META).is_file():  # its step deleted or incomplete
        p = p.parent
    if not p.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    if p.is_dir() and p.name.startswith(STEP_PREFIX) and step_number(p) >= 0 and not (p / META).exists():
        load_meta(p)  # a step named outright is not swapped for another: say what it lacks
    if p.is_dir() and not (p / META).exists():
        for d in (p, p / "checkpoints"):
            found = CheckpointStore(d).latest()
            if found is not None:
                return found
        raise CheckpointError(f"'{path}' holds no checkpoint (no meta.json, no latest link)")
    return p.resolve()


def read_meta(path: str | Path) -> dict[str, Any]:
    return load_meta(resolve(path))


class CheckpointStore:
    """The step directories under `ckpt_dir`: atomic saves around an engine's writer, verified loads."""

    def __init__(self, ckpt_dir: str | Path, keep_last: int = 2, keep_best: bool = True, timeout_s: float = 600.0):
        self.dir = Path(ckpt_dir)
        self.keep_last = max(1, keep_last)
        self.keep_best = keep_best
        self.timeout_s = timeout_s  # the async writer's own process group: as long as the world's
        self._group: Any = None  # that group (created at the first async save, by every rank)
        self._pending: tuple[int, Future] | None = None  # (step, its background completion) in flight
        self.hash_s = 0.0  # seconds this rank spent hashing its share in the last finished save (benches)
        self.published_at = 0.0  # time.perf_counter() when the last async save was published

    # ------------------------------------------------------------------ queries
    def latest(self) -> Path | None:
        """The step to resume from: the `latest` link's target or, when the link is missing or points to a
        deleted directory, the newest complete step directory (`link_ok()` tells which)."""
        link = self.dir / "latest"
        if (link / META).is_file():
            return link.resolve()
        steps = complete_steps(self.dir)
        return steps[-1] if steps else None

    def link_ok(self) -> bool:
        """`latest` names a complete step (one with meta.json)."""
        return (self.dir / "latest" / META).is_file()

    def incomplete_steps(self) -> list[Path]:
        """Step directories without meta.json: not ours to resume from, nor to overwrite."""
        done = set(complete_steps(self.dir))
        return [p for p in self._steps() if p not in done]

    def _steps(self) -> list[Path]:
        return step_dirs(self.dir)

    # ------------------------------------------------------------------ save
    def save(
        self,
        step: int,
        write: Callable[[Path], None],
        train_state: dict[str, Any],
        config_yaml: str,
        meta: dict[str, Any],
    ) -> Path:
        """Collective: every rank calls it. `write(tmp)` is the engine's writer (model and optimizer state,
        each rank its part); this method wraps it in the atomic sequence: the tmp
        directory, RNG streams, `train_state` (the same on all ranks; rank 0 writes it), the config, then
        meta.json with checksums, rename, `latest`. Returns the final step directory. A failed write (e.g.
        a full disk) removes the partial directory and raises CheckpointError on every rank."""
        self.wait()
        tmp, final = self._begin(step)
        problem = None
        try:
            write(tmp)
            self._write_common(tmp, _rank(), train_state, config_yaml)
        except (Exception, CheckpointException) as e:  # CheckpointException derives from BaseException
            problem = _reason(e)
        return self._finish(step, tmp, final, meta, problem)

    def save_async(
        self,
        step: int,
        write_async: Callable[[Path, Any], Future],
        train_state: dict[str, Any],
        config_yaml: str,
        meta: dict[str, Any],
    ) -> None:
        """Collective: `save` with the engine's shards written in the background. Returns once
        `write_async(tmp, group)` has staged this rank's state (its Future then completes when the shards
        are on disk) and the small files are written; hashing and publishing follow in a background thread
        once every rank's write is done, on `group`. An earlier save still in flight is finished first
        (`wait`); a failure shows there, as the same CheckpointError `save` raises."""
        self.wait()
        group = self._async_group()
        tmp, final = self._begin(step)
        problem, written = None, None
        try:
            self._write_common(tmp, _rank(), train_state, config_yaml)
            written = write_async(tmp, group)
        except (Exception, CheckpointException) as e:
            problem = _reason(e)
        # Every rank staged, or none goes on. (A rank whose write did start while another's failed is left
        # with a writer waiting on a peer; it fails after parallel.timeout_s, like any lost collective.)
        if (problem := _agree(problem)) is not None:
            self._finish(step, tmp, final, meta, problem)

        def complete() -> Path:
            err = None
            try:
                written.result()
            except (Exception, CheckpointException) as e:
                err = _reason(e)
            done = self._finish(step, tmp, final, meta, err, group)
            self.published_at = time.perf_counter()
            return done

        worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kimi-checkpoint")
        self._pending = (step, worker.submit(complete))
        worker.shutdown(wait=False)  # the thread ends with its one job

    def pending_step(self) -> int | None:
        """The step of the async save in flight (written or not), None when there is none."""
        return self._pending[0] if self._pending else None

    def wait(self) -> Path | None:
        """Collective: finish the async save in flight, if any; its step directory (None when there was
        none). Raises its CheckpointError."""
        if self._pending is None:
            return None
        _, done = self._pending
        self._pending = None
        return done.result()

    def _async_group(self) -> Any:
        """A gloo group of the whole world for the background writer: DCP's planning collectives and our
        agreement then never interleave with the step's own collectives on the world group."""
        if self._group is None and dist.is_initialized():
            self._group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout_s))
        return self._group

    def _begin(self, step: int) -> tuple[Path, Path]:
        """Collective: rank 0 removes stale `.tmp` directories and makes this step's; (tmp, final)."""
        name = f"{STEP_PREFIX}{step:06d}"
        final, tmp = self.dir / name, self.dir / f"{name}.tmp"
        problem = None
        if _rank() == 0:
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                for stale in self.dir.glob("*.tmp"):
                    shutil.rmtree(stale, ignore_errors=True)
                tmp.mkdir()
            except OSError as e:
                problem = _reason(e)
        if (problem := _agree(problem)) is not None:
            raise self._failed(step, problem)
        _pause_for_test("tmp", step, self.dir.parent)
        return tmp, final

    def _finish(self, step: int, tmp: Path, final: Path, meta: dict[str, Any], problem: str | None,
                group: Any = None) -> Path:  # fmt: skip
        """Collective (over `group`): once every rank has written its part (`problem` None), each hashes its
        `share` of the files, rank 0 gathers the checksums and publishes; else (or if that fails) rank 0
        removes the tmp directory and every rank raises CheckpointError."""
        rank = dist.get_rank(group) if dist.is_initialized() else 0
        world = dist.get_world_size(group) if dist.is_initialized() else 1
        sums: dict[str, str] = {}
        if (problem := _agree(problem, group)) is None:  # the barrier: every rank's files are in
            _pause_for_test("shards", step, self.dir.parent)
            t0 = time.perf_counter()
            try:
                sums = _hash_files(tmp, share(_files(tmp), rank, world))
            except OSError as e:
                problem = _reason(e)
            self.hash_s = time.perf_counter() - t0
        parts = _gather((problem, sums), group)
        problem = next((p for p, _ in parts if p), None)
        if problem is None and rank == 0:
            try:
                merged = dict(sorted((kv for _, s in parts for kv in s.items()), key=lambda kv: Path(kv[0])))
                self._publish(step, tmp, final, meta, merged)
            except OSError as e:
                problem = _reason(e)
        if (problem := _agree(problem, group)) is not None:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise self._failed(step, problem)
        return final

    def _failed(self, step: int, problem: str) -> CheckpointError:
        last = self.latest()
        kept = f"'latest' still points to the last good one, {last.name}" if last else "no earlier checkpoint exists"
        return CheckpointError(f"the checkpoint at step {step} could not be written ({problem}); {kept}")

    @staticmethod
    def _write_common(tmp: Path, rank: int, train_state: dict[str, Any], config_yaml: str) -> None:
        """Every rank its RNG state; rank 0 also the training state and the config."""
        (tmp / "rng").mkdir(exist_ok=True)
        _save_file(rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
        if rank == 0:
            _save_file(train_state, tmp / "train_state.pt")
            (tmp / "config.yaml").write_text(config_yaml)

    def _publish(self, step: int, tmp: Path, final: Path, meta: dict[str, Any], sums: dict[str, str]) -> None:
        """Rank 0, once every rank has written and hashed its part: meta.json (with the checksums of all
        files; the filesystem is shared, as the rename already assumes), rename, `latest`, `best`, rotation."""
        commit, dirty = git_state(Path(__file__).resolve().parent)
        meta = {
            **meta,
            "step": step,
            "world_size": _world(),
            "git_commit": commit or "unknown",
            "git_dirty": dirty,
            "torch": torch.__version__,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "checksums": sums,
        }
        meta["meta_sha256"] = _meta_sha256(meta)
        (tmp / META).write_text(json.dumps(meta, indent=2))
        _pause_for_test("meta", step, self.dir.parent)
        if final.exists():  # re-saving a step (e.g. preempted right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _pause_for_test("renamed", step, self.dir.parent)
        self._point("latest", final)
        _pause_for_test("linked", step, self.dir.parent)
        val = meta.get("val_loss")
        if self.keep_best and val is not None and val < self._best_val():
            self._point("best", final)
        self._rotate()

    def _point(self, link_name: str, target: Path) -> None:
        tmp_link = self.dir / f".{link_name}.new"
        if tmp_link.is_symlink() or tmp_link.exists():
            tmp_link.unlink()
        os.symlink(target.name, tmp_link)
        os.replace(tmp_link, self.dir / link_name)

    def _best_val(self) -> float:
        best = self.dir / "best"
        if not best.exists():
            return float("inf")
        try:
            val = load_meta(best.resolve()).get("val_loss")
        except CheckpointError:  # a damaged best step is not worth keeping as `best`
            return float("inf")
        return float("inf") if val is None else val

    def _rotate(self) -> None:
        keep = {p.resolve() for p in (self.dir / "latest", self.dir / "best") if p.exists()}
        steps = self._steps()
        for p in steps[: max(0, len(steps) - self.keep_last)]:
            if p.resolve() not in keep:
                shutil.rmtree(p, ignore_errors=True)

    # ------------------------------------------------------------------ load
    def load(self, path: str | Path, read: Callable[[Path], None]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Collective: check the step's files against its checksums, let the engine's `read(step_dir)`
        restore model and optimizer in place, restore this rank's RNG stream
        where one was saved (same world size); returns (train_state, meta)."""
        path = resolve(path)
        verify(path, collective=True)
        read(path)
        train_state = torch.load(path / "train_state.pt", weights_only=False)
        rng_file = path / "rng" / f"rank_{_rank():05d}.pt"
        if rng_file.exists():
            set_rng_state(torch.load(rng_file, weights_only=False))
        return train_state, load_meta(path)
