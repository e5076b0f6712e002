"""The MLflow side of the tracker: one background thread that owns the MlflowClient.

The training thread only appends to in-memory queues (`add_metrics`, `add_artifact`: microseconds).
The thread connects (create or reopen the run, log params and tags), then every `flush_interval`
seconds, or as soon as FLUSH_POINTS metric points are queued, sends them with `log_batch`
(<= 1000 points a call, MLflow's limit; ~0.2 s to a local sqlite file, ~0.9 s through a server on a
busy 2-core box), uploads queued artifacts, and samples system metrics every `system_interval` s.

Failure policy (a logging backend never raises into training): the first failed call (server gone,
sqlite locked, network error) logs ONE warning line and marks MLflow "down"; points keep queueing (up
to MAX_QUEUED, oldest dropped beyond) and one retry happens every `retry_interval` s (60 by default).
When a retry succeeds the backlog is sent and one info line says so; no further warnings either way.
MLflow's HTTP client would retry a dead server for minutes by default, so unless the user set them,
MLFLOW_HTTP_REQUEST_MAX_RETRIES / _BACKOFF_FACTOR / _TIMEOUT are lowered to 2 / 1 / 5 s, which makes a
refused connection cost ~2-3 s and a black-holed one <= ~18 s, all of it in this thread. MLflow's usage
telemetry is switched off too (MLFLOW_DISABLE_TELEMETRY), unless the user set that variable.

Resume (`reconcile`): points still queued when a job was killed never reached MLflow, though
metrics.jsonl has them; and the points a killed job sent after its last checkpoint are sent again when
the resumed job redoes those steps. So before it sends anything else, a resumed sink reads the run's
history of every metric it holds or metrics.jsonl names, sends the (key, step) points of metrics.jsonl
the run lacks, and from then on drops queued points whose (key, step) the run already holds (system/
metrics excepted: they are samples, several per step). A (key, step) is never sent twice; MLflow cannot
delete points, so duplicates already in a run stay. The cost is one history read per metric name at
resume (a long run: a few MB), in this thread.
"""

from __future__ import annotations

import collections
import logging
import os
import posixpath
import re
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("kimi.tracking")

FLUSH_POINTS = 1000  # MLflow's max metrics per log_batch; also the "flush now" queue length
MAX_QUEUED = 200_000  # metric points kept while MLflow is down (~ tens of MB); oldest dropped beyond
ENV_DEFAULTS = {  # applied with setdefault: a value the user exported wins
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    "MLFLOW_DISABLE_TELEMETRY": "true",  # no usage pings from (often offline) training nodes
}
_MAX_PARAMS_PER_BATCH, _MAX_PARAM_VALUE, _MAX_KEY = 100, 6000, 250  # MLflow's limits

# MLflow's UI (3.x) opens an experiment in its GenAI view ("Traces", "Evaluations") or its
# model-training view ("Runs", charts) after the experiment tag below; kimi's experiments are training.
# Set when the tracker creates or first reuses an experiment; a kind someone chose in the UI is kept.
KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"

# The UI groups a run's charts into sections by the metric name before its last "/", shows the named
# sections in alphabetical order and only then the unprefixed ones ("Model metrics") and "system/"
# ("System metrics") (extractChartSectionName and the section sort in mlflow/server/js). So that the
# curves one looks at first open the page, they alone get a prefix on the MLflow side; every other
# metric the trainer logs is unprefixed. metrics.jsonl keeps the plain names.
TRAIN_SECTION = ("loss", "val_loss", "val_ppl", "lr", "grad_norm")


class MlflowSink:
    """Ships metrics/params/tags/artifacts to one MLflow run from a daemon thread. Never raises."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_name: str | None,
        params: dict[str, str],
        resume_run_id: str | None,
        artifact_location: str | None,
        flush_interval: float,
        system_interval: float,
        retry_interval: float,
        fallback_note: str,
        sampler: Any = None,
        tags_fn: Any = None,
        reconcile: Callable[[], list[tuple[int, int, dict[str, float]]]] | None = None,
    ) -> None:
        self.uri, self.experiment, self.run_name = uri, experiment, run_name
        self._params, self._resume_id, self._artifact_location = params, resume_run_id, artifact_location
        self._flush_s, self._sys_s, self._retry_s = max(0.01, flush_interval), system_interval, retry_interval
        self._note, self._sampler, self._tags_fn = fallback_note, sampler, tags_fn
        # (step, timestamp_ms, {key: value}) rows the run should hold; None once reconciled (see the top)
        self._reconcile_rows = reconcile
        self._held: set[tuple[str, int]] = set()  # (MLflow key, step) the run held past those rows
        self._cv = threading.Condition()
        self._points: collections.deque = collections.deque()  # (key, value, timestamp_ms, step)
        self._artifacts: collections.deque = collections.deque()  # (local_path, artifact_dir or None)
        self._closing: str | None = None  # the run status once finish() was asked for
        self._dropped = 0
        self._last_step = 0
        self._client = None
        self._meta: tuple[dict[str, str], dict[str, str]] | None = None  # params/tags not yet sent
        self.run_id: str | None = None
        self.down = False  # True after a failure, until a retry succeeds
        self._warned = False
        self._retry_at = 0.0
        self._attempted = threading.Event()  # set after the first connection attempt, whatever its outcome
        self._done = threading.Event()
        # Set here, on the caller's thread: setenv racing getenv in another thread can crash glibc.
        for k, v in ENV_DEFAULTS.items():
            os.environ.setdefault(k, v)
        logging.getLogger("urllib3.connectionpool").addFilter(_quiet_retries)
        self._thread = threading.Thread(target=self._main, name=_THREAD_NAME, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ training thread side (cheap)

    def add_metrics(self, step: int, metrics: dict[str, float], ts_ms: int) -> None:
        with self._cv:
            self._last_step = step
            for k, v in metrics.items():
                self._points.append((k, v, ts_ms, step))
            if len(self._points) > MAX_QUEUED:
                for _ in range(len(self._points) - MAX_QUEUED):
                    self._points.popleft()
                    self._dropped += 1
            if len(self._points) >= FLUSH_POINTS and not self.down:
                self._cv.notify()

    def add_artifact(self, path: str, artifact_path: str | None = None) -> None:
        with self._cv:
            self._artifacts.append((str(path), artifact_path))
            self._cv.notify()

    def wait_run_id(self, timeout: float) -> str | None:
        """The run's id once the first connection attempt has finished (None if it failed)."""
        self._attempted.wait(timeout)
        return self.run_id

    def close(self, status: str, timeout: float) -> bool:
        """Flush, upload queued artifacts, end the run with `status`; True if that all finished in time.

        On a timeout the thread is abandoned (a daemon: it dies with the process) and silenced, so the
        warning said here, or the one said before, stays the only one."""
        with self._cv:
            if self._closing is None:
                self._closing = status
            self._cv.notify()
        if self._done.wait(timeout):
            return True
        self._warn_once(
            "MLflow did not finish within %g s (logging.finish_timeout; %s); the run may stay RUNNING "
            "without its last metrics/artifacts; %s has every metric",
            timeout, self.uri, self._note,
        )  # fmt: skip
        return False

    def _warn_once(self, msg: str, *args: Any) -> bool:
        with self._cv:  # close() (training thread) and _fail() (this thread) may race for the one warning
            first, self._warned = not self._warned, True
        if first:
            log.warning(msg, *args)
        return first

    # ------------------------------------------------------------------ background thread

    def _main(self) -> None:
        try:
            if self._connect() and self._reconcile_rows is not None:
                self._flush(force=True)  # reconcile a resumed run now; after _connect, so run_id waits not for it
            next_flush, next_sys = time.monotonic() + self._flush_s, time.monotonic() + self._sys_s
            while True:
                with self._cv:
                    while self._closing is None and not self._work_waiting():
                        left = min(next_flush, next_sys) - time.monotonic()
                        if left <= 0:
                            break
                        self._cv.wait(left)
                    closing, work = self._closing, self._work_waiting()
                now = time.monotonic()
                if (now >= next_sys or closing is not None) and self._sampler is not None:  # + a last sample at the end
                    next_sys = now + self._sys_s
                    self._sample_system()
                if closing is not None:
                    self._finish(closing)
                    return
                if now >= next_flush or work:
                    next_flush = now + self._flush_s
                    self._flush(force=False)
        except Exception as e:  # a bug here must not take training down; say so once
            self._fail("tracker thread", e)
        finally:
            self._attempted.set()
            self._done.set()

    def _work_waiting(self) -> bool:
        """A full batch or an artifact is queued and MLflow is up (while down, only the timers wake us)."""
        return not self.down and (len(self._points) >= FLUSH_POINTS or bool(self._artifacts))

    def _sample_system(self) -> None:
        try:
            sample = self._sampler.sample()
        except Exception as e:
            log.debug("system metrics sample failed: %s", e)
            return
        self.add_metrics(self._last_step, sample, int(time.time() * 1000))

    def _connect(self) -> bool:
        try:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
            run = self._reopen() if self._resume_id else None
            if run is None:
                run = self._create()
            self.run_id = run.info.run_id  # known before params go out, so a retry never makes a second run
            self._send_meta()
            return True
        except Exception as e:
            self._fail("connect", e)
            return False
        finally:
            self._attempted.set()

    def _reopen(self):
        from mlflow.exceptions import MlflowException

        try:
            run = self._client.get_run(self._resume_id)
        except MlflowException as e:
            if getattr(e, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                raise
            log.warning("MLflow run %s not found in %s; starting a new run", self._resume_id, self.uri)
            return None
        if run.info.status != "RUNNING":
            self._client.update_run(run.info.run_id, status="RUNNING")
        self._mark_training(self._client.get_experiment(run.info.experiment_id))
        old = run.data.params
        changed = sorted(k for k, v in self._params.items() if k in old and old[k] != v)
        new = {k: v for k, v in self._params.items() if k not in old}
        tags = self._tags_fn() if self._tags_fn else {}
        if changed:  # MLflow params are immutable; record that the resumed job ran with other values
            log.info("resumed MLflow run keeps its original params; changed on resume: %s", ", ".join(changed))
            tags["changed_params_on_resume"] = ", ".join(f"{k}={self._params[k]}" for k in changed)[:_MAX_PARAM_VALUE]
        self._meta = (new, tags)
        return run

    def _create(self):
        exp = self._client.get_experiment_by_name(self.experiment)
        if exp is None:
            exp_id = self._client.create_experiment(
                self.experiment, artifact_location=self._artifact_location, tags={KIND_TAG: TRAINING_KIND}
            )
        else:
            exp_id = exp.experiment_id
            if exp.lifecycle_stage == "deleted":
                self._client.restore_experiment(exp_id)
            self._mark_training(exp)
        tags = self._tags_fn() if self._tags_fn else {}
        if self._resume_id:
            tags["resumed_from_run_id"] = self._resume_id
        run = self._client.create_run(exp_id, run_name=self.run_name, tags=tags)
        self._meta = (self._params, {})
        return run

    def _mark_training(self, exp) -> None:
        """Tag an experiment made before kimi set the kind (or by someone else) as model training."""
        if KIND_TAG not in exp.tags:
            self._client.set_experiment_tag(exp.experiment_id, KIND_TAG, TRAINING_KIND)

    def _send_meta(self) -> None:
        """Params (<= 100 per call, values cut to 6000 chars) and tags; kept for the retry if this fails."""
        if self._meta is None:
            return
        from mlflow.entities import Param, RunTag

        params, tags = self._meta
        run_id = self.run_id
        items = [Param(k[:_MAX_KEY], v[:_MAX_PARAM_VALUE]) for k, v in params.items()]
        for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            self._client.log_batch(run_id, params=items[i : i + _MAX_PARAMS_PER_BATCH])
        tag_items = [RunTag(k[:_MAX_KEY], str(v)[:_MAX_PARAM_VALUE]) for k, v in tags.items()]
        for i in range(0, len(tag_items), _MAX_PARAMS_PER_BATCH):
            self._client.log_batch(run_id, tags=tag_items[i : i + _MAX_PARAMS_PER_BATCH])
        self._meta = None

    def _flush(self, force: bool) -> bool:
        """Send queued points then artifacts. While down, only every `retry_interval` s (or when forced)."""
        if self.down and not force and time.monotonic() < self._retry_at:
            return False
        if self.run_id is None and not self._connect():
            return False
        from mlflow.entities import Metric

        was_down = self.down
        try:
            self._send_meta()
        except Exception as e:
            self._fail("log params", e)
            return False
        try:
            self._reconcile()
        except Exception as e:
            self._fail("reconcile with metrics.jsonl", e)
            return False
        while True:
            with self._cv:
                chunk = [self._points.popleft() for _ in range(min(FLUSH_POINTS, len(self._points)))]
            if not chunk:
                break
            if self._held:
                chunk = [p for p in chunk if (mlflow_key(p[0]), p[3]) not in self._held]
            try:
                self._client.log_batch(self.run_id, metrics=[Metric(mlflow_key(k), v, t, s) for k, v, t, s in chunk])
            except Exception as e:
                with self._cv:  # keep them for the retry, in order
                    self._points.extendleft(reversed(chunk))
                self._fail("log_batch", e)
                return False
        while True:
            with self._cv:
                if not self._artifacts:
                    break
                path, art_dir = self._artifacts[0]
            try:
                if os.path.exists(path):
                    self._client.log_artifact(self.run_id, path, art_dir)
                else:
                    log.warning("artifact %s vanished before upload; skipped", path)
            except Exception as e:
                self._fail("log_artifact", e)
                return False
            with self._cv:
                self._artifacts.popleft()
        if was_down:
            self.down = False
            lost = f" ({self._dropped} oldest points were dropped while it was down)" if self._dropped else ""
            log.info("MLflow logging is back on (%s); queued metrics sent%s", self.uri, lost)
        return True

    def _reconcile(self) -> None:
        """Send what the resumed run lacks of metrics.jsonl; remember what it holds past it (see the top).
        Safe to repeat after a failure: it reads the run's histories again."""
        if self._reconcile_rows is None or self.run_id is None:
            return
        from mlflow.entities import Metric

        rows = self._reconcile_rows()
        last = max((step for step, _, _ in rows), default=0)
        keys = {mlflow_key(k) for _, _, metrics in rows for k in metrics}
        keys |= {k for k in self._client.get_run(self.run_id).data.metrics if not k.startswith("system/")}
        held = {(m.key, m.step) for key in sorted(keys) for m in self._client.get_metric_history(self.run_id, key)}
        missing = [
            Metric(mlflow_key(k), v, ts, step)
            for step, ts, metrics in rows
            for k, v in metrics.items()
            if (mlflow_key(k), step) not in held
        ]
        for i in range(0, len(missing), FLUSH_POINTS):
            self._client.log_batch(self.run_id, metrics=missing[i : i + FLUSH_POINTS])
        self._held = {(key, step) for key, step in held if step > last}
        self._reconcile_rows = None
        if missing or self._held:
            log.info("MLflow run %s reconciled with %s: %d missing points sent; %d points after step %d already "
                     "held (not sent again)", self.run_id, self._note, len(missing), len(self._held), last)  # fmt: skip

    def _finish(self, status: str) -> None:
        if self._flush(force=True) and self.run_id is not None:
            try:
                self._client.set_terminated(self.run_id, status=status)
            except Exception as e:
                self._fail("set_terminated", e)

    def _fail(self, what: str, e: BaseException) -> None:
        self.down = True
        self._retry_at = time.monotonic() + self._retry_s
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        if not self._warn_once(
            "MLflow logging is off (%s failed for %s: %s); %s still has every metric; retrying every %g s",
            what, self.uri, reason, self._note, self._retry_s,
        ):  # fmt: skip
            log.debug("MLflow %s failed again: %s", what, e)


def _quiet_retries(record: logging.LogRecord) -> bool:
    """Drop urllib3's per-retry "Retrying (...)" warnings raised from our thread: the one line from
    `_fail` already says MLflow is down. Other threads' urllib3 logging is untouched."""
    return not (threading.current_thread().name == _THREAD_NAME and record.getMessage().startswith("Retrying"))


_THREAD_NAME = "kimi-mlflow"
_BAD_CHARS = re.compile(r"[^/\w.\- :]")
_key_cache: dict[str, str] = {}


def mlflow_key(key: str) -> str:
    """The MLflow name of a metric: `train/` + key for TRAIN_SECTION's keys; then only the characters MLflow
    accepts ([alnum _ - . space : /]), no empty/`.`/`..` path parts, <= 250 chars."""
    out = _key_cache.get(key)
    if out is None:
        if key in TRAIN_SECTION:
            key = f"train/{key}"
        parts = [p for p in _BAD_CHARS.sub("_", str(key)).split("/") if p not in ("", ".", "..")]
        out = posixpath.join(*parts)[:_MAX_KEY] if parts else "_"
        _key_cache[key] = out
    return out
