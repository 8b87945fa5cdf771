"""A scripted job runner and a faulty job store, for the job manager's tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from refit.errors import (
    InvalidArgument,
)
from refit.storage import StoreUnreachable
from trainer.jobs.context import JobContext
from trainer.jobs.manager import JobManager
from trainer.jobs.records import (
    PUBLISHING,
    TRAINING,
    JobCancelled,
    JobFailed,
    JobInterrupted,
    JobRecord,
    JobStore,
)


class ScriptedRunner:
    """Each job trains until released (or cancelled); ``fail`` names models that fail."""

    def __init__(self, fail: tuple[str, ...] = (), interrupt: dict | None = None) -> None:
        self.fail = fail
        self.interrupt = dict(interrupt or {})  # model -> runs that hit an outage first
        self.started: list[str] = []
        self.running = 0
        self.max_running = 0
        self.release = threading.Event()
        self.abandoned: list[str] = []

    def validate(self, request: dict) -> None:
        if not request.get("dataset_uri", "").startswith("s3://"):
            raise InvalidArgument("dataset_uri must be s3://")

    def run(self, job: JobRecord, context: JobContext) -> None:
        self.started.append(job.model)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            context.update(version="1")
            context.set_state(TRAINING)
            if self.interrupt.get(job.model, 0) > 0:
                self.interrupt[job.model] -= 1
                raise JobInterrupted("the object store is unreachable")
            while not self.release.wait(0.01):
                if context.cancelled():
                    raise JobCancelled("training cancelled in epoch 0")
            if job.model in self.fail:
                raise JobFailed(f"{job.model}: no images")
            context.set_state(PUBLISHING)
        finally:
            self.running -= 1

    def abandon(self, job: JobRecord) -> None:
        self.abandoned.append(job.id)


def request(model: str) -> dict:
    return {"model": model, "dataset_uri": f"s3://data/{model}"}


def wait_state(manager: JobManager, job_id: str, *states: str, timeout: float = 10) -> JobRecord:
    """Follows the job's events (no polling) until it is in one of ``states``."""
    deadline = time.monotonic() + timeout
    for _, job in manager.follow(job_id, alive=lambda: time.monotonic() < deadline):
        if job.state in states:
            return job
    raise AssertionError(f"job stayed {manager.get(job_id).state}, wanted {states}")


class FaultyStore(JobStore):
    """A store that stalls or fails: the saves that ``affects`` picks (all by default) block while
    ``gate`` is clear, then raise while ``refusing`` (as an unreachable object store does)."""

    def __init__(
        self, store: JobStore, affects: Callable[[JobRecord], bool] = lambda record: True
    ) -> None:
        super().__init__(store.store, store.bucket)
        self.affects = affects
        self.gate = threading.Event()
        self.gate.set()
        self.stalled = threading.Event()  # a save is waiting at the closed gate
        self.refusing = False

    def save(self, record: JobRecord) -> None:
        if self.affects(record):
            if not self.gate.is_set():
                self.stalled.set()
            self.gate.wait(30)
            if self.refusing:
                raise StoreUnreachable("the object store at 127.0.0.1:9 is unreachable")
        super().save(record)


def jobs_in_store(manager: JobManager) -> dict[str, JobRecord]:
    return {r.id: r for r in manager.store.load_all()}
