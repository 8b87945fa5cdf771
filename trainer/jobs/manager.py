"""The job queue: one job runs at a time (one device; the worker is trainer/jobs/queue_worker.py),
the rest wait in submission order; one active job per model name. Watchers follow jobs through
an in-memory event log.

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

Watchers follow jobs through ``EventLog`` (trainer/jobs/events.py), which shares this class's
lock: each event is appended under the lock of the record change it reports.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Iterator

from refit.errors import AlreadyExists, NotFound, Unavailable
from refit.retry import Backoff
from trainer import metrics
from trainer.jobs.context import JobRunner
from trainer.jobs.events import EventLog
from trainer.jobs.queue_worker import QueueWorker
from trainer.jobs.records import (
    CANCELLED,
    EXPORTING,
    FAILED,
    LOADING_DATA,
    PUBLISHING,
    QUEUED,
    RUNNING,
    JobRecord,
    JobStore,
    QueueFull,
    TooLateToCancel,
    new_job_id,
    now,
)

log = logging.getLogger(__name__)


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
        self.backoff = Backoff(retry_backoff_s)  # between runs of a job a store outage stopped
        self._jobs: dict[str, JobRecord] = {}
        self._queue: list[str] = []
        self._cancels: dict[str, threading.Event] = {}
        self._cancelling: set[str] = set()  # queued jobs whose CANCELLED record is being written
        self._cond = threading.Condition()  # guards the fields above; never held for I/O
        self._save_lock = threading.Lock()  # one store writer at a time: records land in order
        self._stop = threading.Event()
        self._events = EventLog(self._cond, self._stop)
        self._worker: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self.recover()
        worker = QueueWorker(self)
        self._worker = threading.Thread(target=worker.run_forever, daemon=True, name="job-worker")
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
                self.end_failed(record.id, FAILED, reason)
                continue
            log.info("resuming job %s (was %s)", record.id, record.state)
            self.update(record.id, {"state": QUEUED}, persist=True, kind="state")
            resumed.append(record.id)
        with self._cond:
            self._queue = resumed + queued  # interrupted jobs first: they had started
            self._forget_old()
        metrics.TRAINER_QUEUE_LENGTH.set(len(self._queue))

    def stopping(self) -> bool:
        """The trainer is shutting down: running jobs stop and resume at the next start."""
        return self._stop.is_set()

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
            self._events.append("state", record)
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
            cursor = self._events.cursor
            first = self._snapshot(job_id) if job_id in self._jobs else None
        first = first or self._from_store(job_id)
        yield "snapshot", first
        if first.terminal:
            return
        for kind, record in self._events.after(cursor, alive):
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
            cursor = self._events.cursor
        return active, self._events.after(cursor, alive, gapless=True)

    # --- the worker (trainer/jobs/queue_worker.py) ------------------------------------------------

    def take_next(self) -> tuple[str, threading.Event] | None:
        """The next job, moved to LOADING_DATA, and its cancel flag; None after a second with
        none startable (or when stopping)."""
        with self._cond:
            self._cond.wait_for(lambda: self._startable() or self._stop.is_set(), timeout=1)
            if self._stop.is_set() or not self._startable():
                return None
            job_id = self._queue.pop(0)
            metrics.TRAINER_QUEUE_LENGTH.set(len(self._queue))
            cancel = self._cancels[job_id] = threading.Event()
            # Leaves QUEUED under the same lock as the pop: a cancel sees one or the other.
            job = self._jobs[job_id]
            self._apply(job, {"attempts": job.attempts + 1, "started_at": now(),
                              "state": LOADING_DATA}, kind="state")  # fmt: skip
        self._persist(job_id)
        return job_id, cancel

    def _startable(self) -> bool:
        """Lock held. The next job may start: it is not being cancelled (the order of the queue
        holds: the jobs behind wait for the outcome of that cancel)."""
        return bool(self._queue) and self._queue[0] not in self._cancelling

    def release(self, job_id: str) -> None:
        """The job's run is over: its cancel flag goes."""
        with self._cond:
            self._cancels.pop(job_id, None)

    def end_failed(self, job_id: str, state: str, reason: str) -> None:
        try:
            self.runner.abandon(self.get(job_id))
        except Exception:
            log.exception("cleaning up job %s failed", job_id)
        self.finish(job_id, state, reason)

    # --- record changes --------------------------------------------------------------------------

    def finish(self, job_id: str, state: str, error: str) -> None:
        self.update(job_id, {"state": state, "error": error, "detail": "", "finished_at": now()},
                     persist=True, kind="state")  # fmt: skip
        self._ended(job_id)

    def _ended(self, job_id: str) -> None:
        job = self.get(job_id)
        metrics.TRAINER_JOBS.labels(job.state.lower()).inc()
        for phase, seconds in job.phase_seconds().items():
            metrics.TRAINER_JOB_PHASE_SECONDS.labels(phase).observe(seconds)

    def update(self, job_id: str, fields: dict, *, persist: bool, kind: str = "") -> None:
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
            self._events.append(kind, record)

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
