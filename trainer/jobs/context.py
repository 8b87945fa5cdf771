"""What the job manager and a job's runner see of each other: the ``JobRunner`` interface the
manager drives (trainer/jobs/runner.py implements it), and the ``JobContext`` a running job
changes its own record through."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Protocol

from trainer.jobs.records import JobRecord

if TYPE_CHECKING:
    from trainer.jobs.manager import JobManager


class JobContext:
    """What a running job may do to its own record."""

    def __init__(self, manager: JobManager, job_id: str, cancel: threading.Event) -> None:
        self._manager, self.job_id, self._cancel = manager, job_id, cancel

    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def stopping(self) -> bool:
        """The trainer is shutting down: a long wait should end (the job resumes on restart)."""
        return self._manager.stopping()

    def wait(self, seconds: float) -> None:
        """Sleeps, waking early when the trainer stops or the job is cancelled."""
        self._cancel.wait(seconds)

    def set_state(self, state: str) -> None:
        self._manager.update(
            self.job_id, {"state": state, "detail": ""}, persist=True, kind="state"
        )

    def update(self, **fields: object) -> None:
        self._manager.update(self.job_id, fields, persist=True)

    def detail(self, text: str) -> None:
        """Says what the job is doing or waiting for (GetJob, WatchJob)."""
        self._manager.update(self.job_id, {"detail": text}, persist=True, kind="detail")

    def progress(self, progress: dict, *, persist: bool) -> None:
        self._manager.update(self.job_id, {"progress": progress}, persist=persist, kind="progress")


class JobRunner(Protocol):
    def validate(self, request: dict) -> None: ...  # raises InvalidArgument
    def run(self, job: JobRecord, context: JobContext) -> None: ...
    def abandon(self, job: JobRecord) -> None: ...  # undo partial work of a failed job
