"""The job queue: one job runs at a time (one device), the rest wait in submission order; one
active job per model name. Watchers follow jobs through an in-memory event log.

Durability: every state change is written through ``JobStore``. On start, ``recover()`` puts jobs
that a restart interrupted back at the head of the queue (the runner resumes them from their
checkpoint), and gives up on a job after ``max_attempts`` interruptions.
"""

from __future__ import annotations

import copy
import functools
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Protocol

from refit import logs
from refit.errors import AlreadyExists, NotFound
from trainer import metrics
from trainer.jobs.records import (
    CANCELLED,
    EXPORTING,
    FAILED,
    LOADING_DATA,
    PUBLISHING,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    JobCancelled,
    JobFailed,
    JobRecord,
    JobStore,
    TooLateToCancel,
    new_job_id,
    now,
)

log = logging.getLogger(__name__)
EVENT_LOG_SIZE = 4096  # a watcher slower than this many events skips the oldest


class JobContext:
    """What a running job may do to its own record."""

    def __init__(self, manager: JobManager, job_id: str, cancel: threading.Event) -> None:
        self._manager, self.job_id, self._cancel = manager, job_id, cancel

    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def set_state(self, state: str) -> None:
        self._manager._transition(self.job_id, state)

    def update(self, **fields: object) -> None:
        self._manager._update(self.job_id, fields, persist=True)

    def progress(self, progress: dict, *, persist: bool) -> None:
        self._manager._update(self.job_id, {"progress": progress}, persist=persist, kind="progress")


class JobRunner(Protocol):
    def validate(self, request: dict) -> None: ...  # raises InvalidArgument
    def run(self, job: JobRecord, context: JobContext) -> None: ...
    def abandon(self, job: JobRecord) -> None: ...  # undo partial work of a failed job


class JobManager:
    def __init__(self, store: JobStore, runner: JobRunner, *, max_attempts: int = 3) -> None:
        self.store = store
        self.runner = runner
        self.max_attempts = max_attempts
        self._jobs: dict[str, JobRecord] = {}
        self._queue: list[str] = []
        self._cancels: dict[str, threading.Event] = {}
        self._cond = threading.Condition()
        self._events: deque[tuple[int, str, JobRecord]] = deque(maxlen=EVENT_LOG_SIZE)
        self._seq = 0
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self.recover()
        self._worker = threading.Thread(target=self._work, daemon=True, name="job-worker")
        self._worker.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stops taking jobs and cancels the running one (it resumes at the next start)."""
        self._stop.set()
        with self._cond:
            for event in self._cancels.values():
                event.set()
            self._cond.notify_all()
        if self._worker is not None:
            self._worker.join(timeout_s)

    def recover(self) -> None:
        interrupted, queued = [], []
        for record in self.store.load_all():
            self._jobs[record.id] = record
            if record.state in RUNNING:
                interrupted.append(record)
            elif record.state == QUEUED:
                queued.append(record.id)
        resumed = []
        for record in interrupted:
            if record.attempts >= self.max_attempts:
                reason = (
                    f"interrupted {record.attempts} times by trainer restarts; giving up "
                    "(the last checkpoint is kept)"
                )
                self._end_failed(record.id, FAILED, reason)
                continue
            log.info("resuming job %s (was %s)", record.id, record.state)
            self._update(record.id, {"state": QUEUED}, persist=True, kind="state")
            resumed.append(record.id)
        self._queue = resumed + queued  # interrupted jobs first: they had started
        metrics.TRAINER_QUEUE_LENGTH.set(len(self._queue))

    # --- requests --------------------------------------------------------------------------------

    def submit(self, request: dict) -> JobRecord:
        self.runner.validate(request)
        model = request["model"]
        with self._cond:
            active = [j for j in self._jobs.values() if j.model == model and not j.terminal]
            if active:
                job = active[0]
                raise AlreadyExists(
                    f"model {model!r} already has an active job {job.id} ({job.state}); "
                    f"cancel it or wait"
                )
            record = JobRecord(id=new_job_id(), model=model, request=request)
            record.entered[QUEUED] = record.created_at
            self._jobs[record.id] = record
            self.store.save(record)
            self._queue.append(record.id)
            metrics.TRAINER_QUEUE_LENGTH.set(len(self._queue))
            self._emit("state", record)
            return self._snapshot(record.id)

    def get(self, job_id: str) -> JobRecord:
        with self._cond:
            return self._snapshot(job_id)

    def queue_position(self, job_id: str) -> int:
        with self._cond:
            return self._queue.index(job_id) + 1 if job_id in self._queue else 0

    def list(self, model: str = "", states: tuple[str, ...] = (), limit: int = 100) -> list:
        with self._cond:
            jobs = [
                copy.deepcopy(j)
                for j in self._jobs.values()
                if (not model or j.model == model) and (not states or j.state in states)
            ]
        jobs.sort(key=lambda j: (j.created_at, j.id), reverse=True)
        return jobs[:limit]

    def cancel(self, job_id: str) -> JobRecord:
        with self._cond:
            job = self._require(job_id)
            if job.terminal:
                raise TooLateToCancel(f"job {job_id} already ended ({job.state})")
            if job.state in (EXPORTING, PUBLISHING):
                raise TooLateToCancel(f"job {job_id} is {job.state}: training is over")
            if job.state == QUEUED:
                self._queue.remove(job_id)
                metrics.TRAINER_QUEUE_LENGTH.set(len(self._queue))
                self._finish(job_id, CANCELLED, "cancelled while queued")
            else:
                self._cancels[job_id].set()  # the runner stops at the next batch
            return self._snapshot(job_id)

    def follow(
        self, job_id: str | None, alive: Callable[[], bool]
    ) -> Iterator[tuple[str, JobRecord]]:
        """One job's snapshot then its events until it ends; or (job_id None) every job's state
        changes until ``alive()`` turns false."""
        with self._cond:
            cursor = self._seq
            if job_id is not None:
                first = self._snapshot(job_id)
        if job_id is not None:
            yield "snapshot", first
            if first.terminal:
                return
        while alive() and not self._stop.is_set():
            with self._cond:
                self._cond.wait_for(functools.partial(self._news_after, cursor), timeout=1)
                new = [e for e in self._events if e[0] > cursor]
                cursor = self._seq
            for _, kind, record in new:
                if (job_id is None and kind != "state") or job_id not in (None, record.id):
                    continue
                yield kind, record
                if job_id is not None and record.terminal:
                    return

    def _news_after(self, cursor: int) -> bool:
        return self._seq > cursor or self._stop.is_set()

    # --- the worker ------------------------------------------------------------------------------

    def _work(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._stop.is_set(), timeout=1)
                if self._stop.is_set() or not self._queue:
                    continue
                job_id = self._queue.pop(0)
                metrics.TRAINER_QUEUE_LENGTH.set(len(self._queue))
                cancel = self._cancels[job_id] = threading.Event()
            with logs.bound(logs.job_id, job_id):  # every log line of the job carries its id
                self._run(job_id, cancel)

    def _run(self, job_id: str, cancel: threading.Event) -> None:
        self._update(job_id, {"attempts": self._jobs[job_id].attempts + 1, "started_at": now()},
                     persist=False)  # fmt: skip
        self._transition(job_id, LOADING_DATA)
        try:
            self.runner.run(self.get(job_id), JobContext(self, job_id, cancel))
        except JobCancelled as exc:
            if self._stop.is_set():
                return  # trainer shutting down: the job stays RUNNING and resumes on restart
            self._end_failed(job_id, CANCELLED, exc.message)
        except JobFailed as exc:
            self._end_failed(job_id, FAILED, exc.message)
        except Exception as exc:
            log.exception("job %s failed", job_id)
            self._end_failed(job_id, FAILED, f"internal error ({type(exc).__name__}: {exc})")
        else:
            self._finish(job_id, SUCCEEDED, "")
        finally:
            with self._cond:
                self._cancels.pop(job_id, None)

    def _end_failed(self, job_id: str, state: str, reason: str) -> None:
        try:
            self.runner.abandon(self.get(job_id))
        except Exception:
            log.exception("cleaning up job %s failed", job_id)
        self._finish(job_id, state, reason)

    # --- record changes --------------------------------------------------------------------------

    def _transition(self, job_id: str, state: str) -> None:
        self._update(job_id, {"state": state}, persist=True, kind="state")

    def _finish(self, job_id: str, state: str, error: str) -> None:
        self._update(job_id, {"state": state, "error": error, "finished_at": now()},
                     persist=True, kind="state")  # fmt: skip
        metrics.TRAINER_JOBS.labels(state.lower()).inc()
        phases = self.get(job_id).phase_seconds()
        for phase, seconds in phases.items():
            metrics.TRAINER_JOB_PHASE_SECONDS.labels(phase).observe(seconds)

    def _update(self, job_id: str, fields: dict, *, persist: bool, kind: str = "") -> None:
        with self._cond:
            record = self._require(job_id)
            for name, value in fields.items():
                setattr(record, name, value)
            if "state" in fields:
                record.entered[fields["state"]] = now()
            if persist:
                self.store.save(record)
            if kind:
                self._emit(kind, record)

    def _emit(self, kind: str, record: JobRecord) -> None:
        # Called with the lock held.
        self._seq += 1
        self._events.append((self._seq, kind, copy.deepcopy(record)))
        self._cond.notify_all()

    def _require(self, job_id: str) -> JobRecord:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}; `refit jobs` lists them")
        return job

    def _snapshot(self, job_id: str) -> JobRecord:
        return copy.deepcopy(self._require(job_id))
