"""One subscription to the trainer's job events per service replica, fanned out to WatchJob.

The trainer's Subscribe stream opens with the record of every active job, then carries every
job's events (state, detail, progress) in order. ``JobHub`` holds that one stream open,
subscribing again whenever it ends, keeps the latest record of each active job, and hands each
WatchJob caller a ``Watcher``: its job's record first (kind "snapshot"), then that job's events in
order, ending after the final state (SUCCEEDED, FAILED, CANCELLED). However many callers watch,
the trainer serves one stream per service replica.

- Order: the hub delivers under one lock, and registers a watcher under it with its current
  record of the job as the snapshot, so a watcher never sees a state older than one it saw.
- A job the hub does not hold (it ended, or its first event is still on the way) is read with
  the trainer's unary GetJob: an ended job gets that record and the stream ends; an unknown id is
  NOT_FOUND; an unreachable trainer UNAVAILABLE. A job still active gets the hub's next record
  of it as its snapshot.
- The trainer stream breaks (a trainer restart, a network cut): watchers stay and wait. Once the
  hub has subscribed again, each gets a fresh snapshot of its job (a job that ended meanwhile:
  its final record) and goes on; only the caller's own deadline bounds the wait.
- A slow watcher never holds the hub up: each buffers WATCHER_BUFFER events, and one that falls
  that far behind skips to the job's latest record, delivered as a snapshot (the progress in
  between is lost, never the order of states or the final record).
- Before a job's SUCCEEDED goes out, the hub calls ``on_success`` (the catalog refresh: the
  trainer may have promoted the new version), so a caller that sees SUCCEEDED finds the new
  default in this replica's catalog: one registry read per finished job, not one per caller.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator

import grpc

from refit.errors import RefitError, Unavailable
from refit.v1 import refit_pb2 as pb
from service.trainer_client import TrainerClient

log = logging.getLogger(__name__)
WATCHER_BUFFER = 256  # events a watcher may fall behind before it skips to the latest record
FINAL = frozenset({pb.SUCCEEDED, pb.FAILED, pb.CANCELLED})
SNAPSHOT = "snapshot"


class Watcher:
    """One WatchJob caller's events: iterate it; ``close()`` it when the caller goes away."""

    def __init__(
        self, job_id: str, release: Callable[[Watcher], None], buffer: int = WATCHER_BUFFER
    ) -> None:
        self.job_id = job_id
        self.buffer = buffer
        self.skips = 0  # times it fell `buffer` events behind
        self._release = release
        self._events: deque[pb.JobEvent] = deque()
        self._cond = threading.Condition()
        self._started = False  # an event was delivered: the next one is not the snapshot
        self._ended = False  # nothing more comes: the final record or an error is buffered
        self._error: RefitError | None = None
        self._closed = False

    @property
    def started(self) -> bool:
        with self._cond:
            return self._started

    def deliver(self, kind: str, job: pb.Job) -> bool:
        """Buffers one event; False once the watcher takes no more (ended or closed)."""
        with self._cond:
            if self._ended or self._closed:
                return False
            if not self._started:
                kind, self._started = SNAPSHOT, True
            elif len(self._events) >= self.buffer:
                self._events.clear()  # too far behind: the newest record stands for them all
                kind = SNAPSHOT
                self.skips += 1
            self._events.append(pb.JobEvent(job=job, kind=kind))
            self._ended = job.state in FINAL
            self._cond.notify_all()
            return not self._ended

    def fail(self, error: RefitError) -> None:
        """Ends the stream with ``error`` once the events buffered before it are read."""
        with self._cond:
            if not (self._ended or self._closed):
                self._error, self._ended = error, True
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._release(self)

    def __iter__(self) -> Iterator[pb.JobEvent]:
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._events or self._ended or self._closed)
                    if self._closed:
                        return
                    if not self._events:
                        if self._error is not None:
                            raise self._error
                        return
                    event = self._events.popleft()
                yield event
        finally:
            self.close()


class JobHub:
    """The replica's one trainer subscription and its watchers (module docstring)."""

    def __init__(
        self,
        trainer: TrainerClient,
        on_success: Callable[[], object],
        *,
        buffer: int = WATCHER_BUFFER,
        retry_s: float = 2.0,
    ) -> None:
        self.trainer = trainer
        self.on_success = on_success
        self.buffer = buffer
        self.retry_s = retry_s
        self.subscriptions = 0  # subscriptions opened so far (a reconnection adds one)
        self._lock = threading.Lock()  # guards the fields below; never held for a call out
        self._jobs: dict[str, pb.Job] = {}  # the latest record of each active job
        self._watchers: dict[str, set[Watcher]] = {}
        self._subscribed = False  # `_jobs` is current: a subscription is open and synced
        self._call: grpc.Call | None = None
        self._closing = threading.Event()

    # --- WatchJob --------------------------------------------------------------------------------

    def watch(self, job_id: str) -> Watcher:
        """A watcher of ``job_id``; NOT_FOUND / UNAVAILABLE from the trainer raise here."""
        with self._lock:
            if self._subscribed and job_id in self._jobs:
                return self._register(job_id, self._jobs[job_id])
        job = self.trainer.get_job(job_id)
        if job.state in FINAL:
            return self._ended(job)
        with self._lock:
            if self._subscribed and job_id in self._jobs:
                return self._register(job_id, self._jobs[job_id])
            watcher = self._register(job_id, None)  # the hub's next record is its snapshot
        try:
            # The job may have ended between the read above and the registration, its final
            # event gone by with no watcher there: read it once more. What ends it after this
            # read reaches the watcher through the hub.
            job = self.trainer.get_job(job_id)
        except RefitError:
            watcher.close()
            raise
        if job.state in FINAL:
            with self._lock:
                if not watcher.started:
                    watcher.deliver(SNAPSHOT, job)
                    self._drop(watcher)
        return watcher

    def _register(self, job_id: str, snapshot: pb.Job | None) -> Watcher:
        # Lock held.
        watcher = Watcher(job_id, self._release, self.buffer)
        if snapshot is not None:
            watcher.deliver(SNAPSHOT, snapshot)
        self._watchers.setdefault(job_id, set()).add(watcher)
        return watcher

    def _ended(self, job: pb.Job) -> Watcher:
        watcher = Watcher(job.id, lambda _: None, self.buffer)
        watcher.deliver(SNAPSHOT, job)
        return watcher

    def _release(self, watcher: Watcher) -> None:
        with self._lock:
            self._drop(watcher)

    def _drop(self, watcher: Watcher) -> None:
        # Lock held.
        watchers = self._watchers.get(watcher.job_id)
        if watchers is not None:
            watchers.discard(watcher)
            if not watchers:
                del self._watchers[watcher.job_id]

    def _fan_out(self, job_id: str, kind: str, job: pb.Job) -> None:
        # Lock held.
        for watcher in list(self._watchers.get(job_id, ())):
            if not watcher.deliver(kind, job):
                self._drop(watcher)

    # --- the subscription ------------------------------------------------------------------------

    def run_forever(self) -> None:
        """Holds the subscription open until ``close()``, subscribing again after a break."""
        while not self._closing.is_set():
            try:
                self._subscription()
            except RefitError as exc:  # watchers wait for the next subscription's snapshot
                if not self._closing.is_set():
                    log.warning("trainer subscription ended (%s); subscribing again", exc.message)
            except Exception:
                log.exception("trainer subscription failed; subscribing again")
            with self._lock:
                self._subscribed = False
            self._closing.wait(self.retry_s)

    def close(self) -> None:
        """Ends the subscription and every watch (the service is stopping)."""
        self._closing.set()
        with self._lock:
            call, watchers = self._call, [w for ws in self._watchers.values() for w in ws]
            self._watchers.clear()
        if call is not None:
            call.cancel()
        stopping = Unavailable("the refit service is stopping; watch the job again")
        for watcher in watchers:
            watcher.fail(stopping)

    def _subscription(self) -> None:
        call = self.trainer.subscribe()
        with self._lock:
            self._call = call
        if self._closing.is_set():  # close() ran before the call was there to cancel
            call.cancel()
        messages = self.trainer.messages(call)
        first = next(messages, None)
        if first is None or first.WhichOneof("item") != "active":
            raise Unavailable("the trainer's subscription did not open with its active jobs")
        self._synced(list(first.active.jobs))
        for message in messages:
            self._apply(message.event)

    def _synced(self, jobs: list[pb.Job]) -> None:
        """A subscription opened: its records replace the hub's and each watcher gets a fresh
        snapshot; the watchers of a job no longer active are settled with GetJob."""
        with self._lock:
            self._jobs = {job.id: job for job in jobs}
            self._subscribed = True
            self.subscriptions += 1
            gone = []
            for job_id in list(self._watchers):
                if job_id in self._jobs:
                    self._fan_out(job_id, SNAPSHOT, self._jobs[job_id])
                else:
                    gone.append(job_id)
        for job_id in gone:
            self._settle(job_id)

    def _settle(self, job_id: str) -> None:
        """Watchers of a job that was not active when the subscription began: it ended (its final
        record ends them) or began since (its events follow on the stream)."""
        try:
            job = self.trainer.get_job(job_id)
        except Unavailable:
            raise  # the subscription is broken too: subscribe again, the watchers wait
        except RefitError as exc:  # NOT_FOUND: the trainer lost the job's record
            with self._lock:
                for watcher in list(self._watchers.pop(job_id, ())):
                    watcher.fail(exc)
            return
        if job.state in FINAL:
            with self._lock:
                self._fan_out(job_id, SNAPSHOT, job)

    def _apply(self, event: pb.JobEvent) -> None:
        job = event.job
        if event.kind == "state" and job.state == pb.SUCCEEDED:
            self._succeeded(job)
        with self._lock:
            if job.state in FINAL:
                self._jobs.pop(job.id, None)
            else:
                self._jobs[job.id] = job
            self._fan_out(job.id, event.kind, job)

    def _succeeded(self, job: pb.Job) -> None:
        try:
            self.on_success()
        except Exception as exc:  # the registry watch catches up; the job's watchers go on
            message = getattr(exc, "message", None) or repr(exc)
            log.warning("job %s succeeded; catalog refresh failed: %s", job.id, message)
