"""The job queue: one job runs at a time (one device), the rest wait in submission order; one
active job per model name. Watchers follow jobs through an in-memory event log.

Durability: every state change is written through ``JobStore``. On start, ``recover()`` puts jobs
that a restart interrupted back at the head of the queue (the runner resumes them from their
checkpoint), and gives up on a job after ``max_attempts`` interruptions. A job whose runner
reports a passing outage (``JobInterrupted``: the object store is unreachable) runs again from
its checkpoint after a backoff, within the same ``max_attempts``. Cancelling a queued job answers
only once its CANCELLED record is stored (memory changes after the store does): were it lost, a
restart would run the job and gc would keep its model's files forever. If that write fails the
cancel fails UNAVAILABLE and the job stays queued in its place; while the write is under way the
worker does not start it (nor, to keep the order, the jobs behind it).

Bounds: at most ``max_queued`` jobs wait (more: RESOURCE_EXHAUSTED); the newest ``history`` ended
jobs stay in memory, older ones are read back from the store when asked for. Store writes happen
outside the lock that readers take, one writer at a time so records land in order.

The watchers' event log stays in this class on purpose: each event is appended under the same
lock as the record change it reports, which is what keeps watchers from seeing changes out of
order; apart, the two halves would share that lock and its invariant across a module boundary.
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
from refit.errors import AlreadyExists, NotFound, RefitError, Unavailable
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
    JobInterrupted,
    JobRecord,
    JobStore,
    QueueFull,
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

    def stopping(self) -> bool:
        """The trainer is shutting down: a long wait should end (the job resumes on restart)."""
        return self._manager._stop.is_set()

    def wait(self, seconds: float) -> None:
        """Sleeps, waking early when the trainer stops or the job is cancelled."""
        self._cancel.wait(seconds)

    def set_state(self, state: str) -> None:
        self._manager._transition(self.job_id, state)

    def update(self, **fields: object) -> None:
        self._manager._update(self.job_id, fields, persist=True)

    def detail(self, text: str) -> None:
        """Says what the job is doing or waiting for (GetJob, WatchJob)."""
        self._manager._update(self.job_id, {"detail": text}, persist=True, kind="detail")

    def progress(self, progress: dict, *, persist: bool) -> None:
        self._manager._update(self.job_id, {"progress": progress}, persist=persist, kind="progress")


class JobRunner(Protocol):
    def validate(self, request: dict) -> None: ...  # raises InvalidArgument
    def run(self, job: JobRecord, context: JobContext) -> None: ...
    def abandon(self, job: JobRecord) -> None: ...  # undo partial work of a failed job


class JobManager:
    def __init__(
        self,
        store: JobStore,
        runner: JobRunner,
        *,
        max_attempts: int = 3,
        max_queued: int = 100,
        history: int = 1000,
        retry_backoff_s: float = 10.0,
    ) -> None:
        self.store = store
        self.runner = runner
        self.max_attempts = max_attempts
        self.max_queued = max_queued
        self.history = history
        self.retry_backoff_s = retry_backoff_s
        self._jobs: dict[str, JobRecord] = {}
        self._queue: list[str] = []
        self._cancels: dict[str, threading.Event] = {}
        self._cancelling: set[str] = set()  # queued jobs whose CANCELLED record is being written
        self._cond = threading.Condition()  # guards the fields above; never held for I/O
        self._save_lock = threading.Lock()  # one store writer at a time: records land in order
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
        with self._cond:
            self._queue = resumed + queued  # interrupted jobs first: they had started
            self._forget_old()
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
            if len(self._queue) >= self.max_queued:
                raise QueueFull(
                    f"{len(self._queue)} jobs are queued (REFIT_TRAINER_MAX_QUEUED); "
                    "retry when some have run"
                )
            record = JobRecord(id=new_job_id(), model=model, request=request)
            record.entered[QUEUED] = record.created_at
            self._jobs[record.id] = record  # holds the model's slot while the record is written
        try:
            self._persist(record.id, required=True)
        except Exception:
            with self._cond:
                del self._jobs[record.id]
            raise
        with self._cond:
            if record.state == QUEUED:  # not cancelled meanwhile
                self._queue.append(record.id)
                metrics.TRAINER_QUEUE_LENGTH.set(len(self._queue))
            self._emit("state", record)
            return self._snapshot(record.id)

    def get(self, job_id: str) -> JobRecord:
        with self._cond:
            if job_id in self._jobs:
                return self._snapshot(job_id)
        return self._from_store(job_id)

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
        """A running job is told to stop (it ends CANCELLED at its next batch); a queued one ends
        CANCELLED here, in the store before in memory, so that a restart cannot run it."""
        with self._cond:
            known = job_id in self._jobs
        if not known:  # a job that left memory has ended long ago (or never was: NOT_FOUND)
            raise TooLateToCancel(f"job {job_id} already ended ({self._from_store(job_id).state})")
        with self._cond:
            if self._stop_running(job_id):
                return self._snapshot(job_id)
        with self._save_lock:  # our write lands in order with the job's others
            with self._cond:
                if self._stop_running(job_id):  # the worker started it while we waited
                    return self._snapshot(job_id)
                self._cancelling.add(job_id)  # the worker must not start it while it is written
                cancelled = self._snapshot(job_id)
            try:
                self._cancel_queued(cancelled)
            finally:
                with self._cond:
                    self._cancelling.discard(job_id)
                    self._cond.notify_all()  # the worker may start the next job
        self._ended(job_id)
        return self.get(job_id)

    def _stop_running(self, job_id: str) -> bool:
        """Lock held. Tells a running job to stop (True); False: the job is queued; raises when it
        is too late to cancel."""
        job = self._require(job_id)
        if job.terminal:
            raise TooLateToCancel(f"job {job_id} already ended ({job.state})")
        if job.state in (EXPORTING, PUBLISHING):
            raise TooLateToCancel(f"job {job_id} is {job.state}: training is over")
        if job.state == QUEUED:
            return False
        self._cancels[job_id].set()  # the runner stops at the next batch
        return True

    def _cancel_queued(self, job: JobRecord) -> None:
        """``_save_lock`` held, ``job`` a snapshot: writes it CANCELLED, then (only once that is
        stored) takes it out of the queue. A failed write changes nothing."""
        fields = {"state": CANCELLED, "error": "cancelled while queued", "finished_at": now()}
        _change(job, fields)
        try:
            self.store.save(job)
        except Exception as exc:
            cause = getattr(exc, "message", None) or repr(exc)
            log.warning("job %s: cancel not saved (%s); the job stays queued", job.id, cause)
            raise Unavailable(
                f"nothing was cancelled: the object store did not record the cancel of job "
                f"{job.id} ({cause}); it is still QUEUED in its place: retry the cancel"
            ) from exc
        with self._cond:
            if job.id in self._queue:  # not when its submit() is still to queue it
                self._queue.remove(job.id)
                metrics.TRAINER_QUEUE_LENGTH.set(len(self._queue))
            self._apply(self._require(job.id), fields, kind="state")

    def follow(self, job_id: str, alive: Callable[[], bool]) -> Iterator[tuple[str, JobRecord]]:
        """One job's snapshot then its events until it ends (or ``alive()`` turns false)."""
        with self._cond:
            cursor = self._seq
            first = self._snapshot(job_id) if job_id in self._jobs else None
        first = first or self._from_store(job_id)
        yield "snapshot", first
        if first.terminal:
            return
        for kind, record in self._log_after(cursor, alive):
            if record.id == job_id:
                yield kind, record
                if record.terminal:
                    return

    def subscribe(
        self, alive: Callable[[], bool]
    ) -> tuple[list[JobRecord], Iterator[tuple[str, JobRecord]]]:
        """Every active job's record, and every job's events after them (state, detail,
        progress) in order until ``alive()`` turns false. Both are taken under one lock: no event
        falls between them. A subscriber that falls EVENT_LOG_SIZE events behind gets
        ``Unavailable`` (it subscribes again) instead of a silent gap."""
        with self._cond:
            active = [copy.deepcopy(j) for j in self._jobs.values() if not j.terminal]
            cursor = self._seq
        return active, self._log_after(cursor, alive, gapless=True)

    def _log_after(
        self, cursor: int, alive: Callable[[], bool], *, gapless: bool = False
    ) -> Iterator[tuple[str, JobRecord]]:
        """The event log after ``cursor``, waiting for more while ``alive()``."""
        while alive() and not self._stop.is_set():
            with self._cond:
                self._cond.wait_for(functools.partial(self._news_after, cursor), timeout=1)
                new = [e for e in self._events if e[0] > cursor]
                if gapless and new and new[0][0] > cursor + 1:
                    raise Unavailable(
                        f"the subscriber fell more than {EVENT_LOG_SIZE} job events behind; "
                        "subscribe again"
                    )
                cursor = self._seq
            for _, kind, record in new:
                yield kind, record

    def _news_after(self, cursor: int) -> bool:
        return self._seq > cursor or self._stop.is_set()

    # --- the worker ------------------------------------------------------------------------------

    def _work(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                self._cond.wait_for(lambda: self._startable() or self._stop.is_set(), timeout=1)
                if self._stop.is_set() or not self._startable():
                    continue
                job_id = self._queue.pop(0)
                metrics.TRAINER_QUEUE_LENGTH.set(len(self._queue))
                cancel = self._cancels[job_id] = threading.Event()
                # Leaves QUEUED under the same lock as the pop: a cancel sees one or the other.
                job = self._jobs[job_id]
                self._apply(job, {"attempts": job.attempts + 1, "started_at": now(),
                                  "state": LOADING_DATA}, kind="state")  # fmt: skip
            with logs.bound(logs.job_id, job_id):  # every log line of the job carries its id
                self._persist(job_id)
                self._run(job_id, cancel)

    def _startable(self) -> bool:
        """Lock held. The next job may start: it is not being cancelled (the order of the queue
        holds: the jobs behind wait for the outcome of that cancel)."""
        return bool(self._queue) and self._queue[0] not in self._cancelling

    def _run(self, job_id: str, cancel: threading.Event) -> None:
        try:
            while True:
                try:
                    self.runner.run(self.get(job_id), JobContext(self, job_id, cancel))
                except JobInterrupted as exc:
                    if self._retry_later(job_id, cancel, exc):
                        continue
                    return
                break
        except JobCancelled as exc:
            if self._stop.is_set():
                return  # trainer shutting down: the job stays RUNNING and resumes on restart
            self._end_failed(job_id, CANCELLED, exc.message)
        except (JobFailed, RefitError) as exc:  # a reason a user can act on, as it stands
            self._end_failed(job_id, FAILED, exc.message)
        except Exception as exc:
            log.exception("job %s failed", job_id)
            self._end_failed(job_id, FAILED, f"internal error ({type(exc).__name__}: {exc})")
        else:
            self._finish(job_id, SUCCEEDED, "")
        finally:
            with self._cond:
                self._cancels.pop(job_id, None)

    def _retry_later(self, job_id: str, cancel: threading.Event, exc: JobInterrupted) -> bool:
        """After a passing outage: wait with backoff and run again (True), or give up (False)."""
        attempts = self.get(job_id).attempts
        if attempts >= self.max_attempts:
            runs = f"{attempts} attempts" if attempts > 1 else "1 attempt"
            self._end_failed(job_id, FAILED, f"{exc.message}; gave up after {runs}")
            return False
        delay = self.retry_backoff_s * 2 ** (attempts - 1)
        log.warning("job %s interrupted (%s); retrying in %.0fs", job_id, exc.message, delay)
        self._update(job_id, {"detail": f"{exc.message}; resuming from the last checkpoint in "
                              f"{delay:.0f}s (attempt {attempts + 1} of {self.max_attempts})"},
                     persist=True, kind="detail")  # fmt: skip
        cancel.wait(delay)
        if self._stop.is_set():
            return False  # resumes on restart
        if cancel.is_set():
            self._end_failed(job_id, CANCELLED, "cancelled while waiting to retry")
            return False
        self._update(job_id, {"attempts": attempts + 1, "detail": ""}, persist=True)
        return True

    def _end_failed(self, job_id: str, state: str, reason: str) -> None:
        try:
            self.runner.abandon(self.get(job_id))
        except Exception:
            log.exception("cleaning up job %s failed", job_id)
        self._finish(job_id, state, reason)

    # --- record changes --------------------------------------------------------------------------

    def _transition(self, job_id: str, state: str) -> None:
        self._update(job_id, {"state": state, "detail": ""}, persist=True, kind="state")

    def _finish(self, job_id: str, state: str, error: str) -> None:
        self._update(job_id, {"state": state, "error": error, "detail": "", "finished_at": now()},
                     persist=True, kind="state")  # fmt: skip
        self._ended(job_id)

    def _ended(self, job_id: str) -> None:
        job = self.get(job_id)
        metrics.TRAINER_JOBS.labels(job.state.lower()).inc()
        for phase, seconds in job.phase_seconds().items():
            metrics.TRAINER_JOB_PHASE_SECONDS.labels(phase).observe(seconds)

    def _update(self, job_id: str, fields: dict, *, persist: bool, kind: str = "") -> None:
        with self._cond:
            self._apply(self._require(job_id), fields, kind)
        if persist:
            self._persist(job_id)

    def _apply(self, record: JobRecord, fields: dict, kind: str = "") -> None:
        # Called with the lock held.
        _change(record, fields)
        if record.terminal and "state" in fields:
            # In the same step: no reader sees more than `history` ended jobs.
            self._forget_old(keep=record.id)
        if kind:
            self._emit(kind, record)

    def _persist(self, job_id: str, *, required: bool = False) -> None:
        """Writes the job's latest record; the snapshot is taken in write order. A write that
        fails is logged and left to the job's next change (the record in memory is the live one),
        so a store outage cannot stop the worker; ``required``: raise instead (a submit)."""
        with self._save_lock:
            with self._cond:
                record = self._snapshot(job_id)
            try:
                self.store.save(record)
            except Exception as exc:
                if required:
                    raise
                log.warning("job %s: record not saved (%s); retried at its next change",
                            job_id, getattr(exc, "message", None) or repr(exc))  # fmt: skip

    def _forget_old(self, keep: str = "") -> None:
        """Keeps the newest ``history`` ended jobs in memory (lock held); the store keeps all.
        ``keep``: a job that just ended, still to be written."""
        ended = sorted(
            (j for j in self._jobs.values() if j.terminal and j.id != keep),
            key=lambda j: (j.finished_at, j.id),
        )
        for job in ended[: max(len(ended) + bool(keep) - self.history, 0)]:
            del self._jobs[job.id]

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

    def _from_store(self, job_id: str) -> JobRecord:
        """A job that has left memory (an old one) is read back from the store."""
        record = self.store.load(job_id)
        if record is None:
            raise NotFound(f"no job {job_id!r}; `refit jobs` lists them")
        return record

    def _snapshot(self, job_id: str) -> JobRecord:
        return copy.deepcopy(self._require(job_id))


def _change(record: JobRecord, fields: dict) -> None:
    """Sets ``fields``; a new state is stamped with its entry time (an end: its ``finished_at``,
    so that a record written before memory changes carries the same times)."""
    for name, value in fields.items():
        setattr(record, name, value)
    if "state" in fields:
        record.entered[fields["state"]] = fields.get("finished_at") or now()
