"""The job worker: one thread that runs queued jobs one at a time (one device), from the head of
the manager's queue. It runs each job through its runner, runs it again from its checkpoint after
a passing outage (``JobInterrupted``: the object store is unreachable) with backoff, within the
job's ``max_attempts``, and ends the job's record with the outcome."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from refit import logs
from refit.errors import RefitError
from trainer.jobs.context import JobContext
from trainer.jobs.records import (
    CANCELLED,
    FAILED,
    SUCCEEDED,
    JobCancelled,
    JobFailed,
    JobInterrupted,
)

if TYPE_CHECKING:
    from trainer.jobs.manager import JobManager

log = logging.getLogger(__name__)


class QueueWorker:
    def __init__(self, manager: JobManager) -> None:
        self.manager = manager

    def run_forever(self) -> None:
        while not self.manager.stopping():
            taken = self.manager.take_next()
            if taken is None:
                continue
            job_id, cancel = taken
            with logs.bound(logs.job_id, job_id):  # every log line of the job carries its id
                self._run(job_id, cancel)

    def _run(self, job_id: str, cancel: threading.Event) -> None:
        manager = self.manager
        try:
            while True:
                try:
                    manager.runner.run(manager.get(job_id), JobContext(manager, job_id, cancel))
                except JobInterrupted as exc:
                    if self._retry_later(job_id, cancel, exc):
                        continue
                    return
                break
        except JobCancelled as exc:
            if manager.stopping():
                return  # trainer shutting down: the job stays RUNNING and resumes on restart
            manager.end_failed(job_id, CANCELLED, exc.message)
        except (JobFailed, RefitError) as exc:  # a reason a user can act on, as it stands
            manager.end_failed(job_id, FAILED, exc.message)
        except Exception as exc:
            log.exception("job %s failed", job_id)
            manager.end_failed(job_id, FAILED, f"internal error ({type(exc).__name__}: {exc})")
        else:
            manager.finish(job_id, SUCCEEDED, "")
        finally:
            manager.release(job_id)

    def _retry_later(self, job_id: str, cancel: threading.Event, exc: JobInterrupted) -> bool:
        """After a passing outage: wait with backoff and run again (True), or give up (False)."""
        manager = self.manager
        attempts, most = manager.get(job_id).attempts, manager.max_attempts
        if attempts >= most:
            runs = f"{attempts} attempts" if attempts > 1 else "1 attempt"
            manager.end_failed(job_id, FAILED, f"{exc.message}; gave up after {runs}")
            return False
        delay = manager.backoff.delay(attempts)
        log.warning("job %s interrupted (%s); retrying in %.0fs", job_id, exc.message, delay)
        detail = (
            f"{exc.message}; resuming from the last checkpoint in {delay:.0f}s "
            f"(attempt {attempts + 1} of {most})"
        )
        manager.update(job_id, {"detail": detail}, persist=True, kind="detail")
        cancel.wait(delay)
        if manager.stopping():
            return False  # resumes on restart
        if cancel.is_set():
            manager.end_failed(job_id, CANCELLED, "cancelled while waiting to retry")
            return False
        manager.update(job_id, {"attempts": attempts + 1, "detail": ""}, persist=True)
        return True
