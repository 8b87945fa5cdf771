"""The job worker with a scripted runner: one job at a time in order, outcomes, runs again after an
outage, and its races with cancels."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import pytest

from refit import logs
from refit.storage import AccessDenied
from tests.trainer.jobs.fakes import FaultyStore, ScriptedRunner, jobs_in_store, request, wait_state
from trainer.jobs.context import JobContext
from trainer.jobs.events import EventLog
from trainer.jobs.manager import JobManager
from trainer.jobs.records import (
    CANCELLED,
    FAILED,
    LOADING_DATA,
    QUEUED,
    SUCCEEDED,
    TRAINING,
    JobRecord,
    JobStore,
)


def test_jobs_run_one_at_a_time_in_submission_order(manager, runner) -> None:
    ids = [manager.submit(request(m)).id for m in ("a", "b", "c")]
    wait_state(manager, ids[0], TRAINING)
    assert manager.queue_position(ids[1]) == 1 and manager.queue_position(ids[2]) == 2
    runner.release.set()
    for job_id in ids:
        assert wait_state(manager, job_id, SUCCEEDED).error == ""
    assert runner.started == ["a", "b", "c"] and runner.max_running == 1


def test_a_failing_job_records_its_reason_and_is_cleaned_up(manager, runner) -> None:
    runner.release.set()
    job = wait_state(manager, manager.submit(request("broken")).id, FAILED)
    assert job.error == "broken: no images" and runner.abandoned == [job.id]


def test_a_job_hit_by_an_outage_runs_again_then_gives_up(jobs: JobStore) -> None:
    runner = ScriptedRunner(interrupt={"flaky": 1, "down": 9})
    runner.release.set()
    manager = JobManager(jobs, runner, max_attempts=3, retry_backoff_s=0.05)
    manager.start()
    try:
        flaky = wait_state(manager, manager.submit(request("flaky")).id, SUCCEEDED, FAILED)
        assert flaky.state == SUCCEEDED and flaky.attempts == 2
        down = wait_state(manager, manager.submit(request("down")).id, SUCCEEDED, FAILED)
        assert down.state == FAILED and down.attempts == 3
        assert down.error == "the object store is unreachable; gave up after 3 attempts"
        assert runner.abandoned == [down.id]
    finally:
        manager.stop()


def test_a_cancel_between_the_workers_pop_and_its_start_is_not_lost(
    jobs: JobStore, runner: ScriptedRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker pops a job, then starts it: a cancel in between used to raise ValueError
    (list.remove on a job no longer queued), so the client got INTERNAL and the cancel was lost."""
    manager = JobManager(jobs, runner)
    outcome: list = []
    bound = logs.bound

    @contextlib.contextmanager
    def cancel_first(var, value):  # runs in the worker right after the pop
        try:
            outcome.append(manager.cancel(value).state)
        except Exception as exc:
            outcome.append(exc)
        with bound(var, value):
            yield

    monkeypatch.setattr(logs, "bound", cancel_first)
    job = manager.submit(request("a"))
    manager.start()
    try:
        assert wait_state(manager, job.id, CANCELLED).error
        assert outcome and not isinstance(outcome[0], Exception), outcome
    finally:
        runner.release.set()
        manager.stop()


class WorkerWatch(threading.Condition):
    """The manager's condition, noting when its worker thread goes to wait although jobs are
    queued: it found none it may start."""

    def __init__(self, manager: JobManager) -> None:
        super().__init__()
        self.manager = manager
        self.held_back = False

    def wait_for(self, predicate: Callable[[], object], timeout: float | None = None) -> object:
        worker = threading.current_thread().name == "job-worker"
        if worker and self.manager._queue and not predicate():
            self.held_back = True
            self.notify_all()
        return super().wait_for(predicate, timeout)


def test_the_worker_never_starts_a_job_whose_cancel_is_being_written(
    jobs: JobStore, runner: ScriptedRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job whose CANCELLED record is on its way to the store must not start meanwhile: the
    store would say CANCELLED (gc removes its work; a restart skips it) while it trains."""
    store = FaultyStore(jobs, affects=lambda record: record.state == CANCELLED)
    manager = JobManager(store, runner)
    watch = manager._cond = WorkerWatch(manager)
    manager._events = EventLog(watch, manager._stop)  # the log shares the lock it replaced
    running = manager.submit(request("a"))
    queued = manager.submit(request("b"))
    outcome: list = []

    def cancel_queued() -> None:
        try:
            outcome.append(manager.cancel(queued.id).state)
        except Exception as exc:
            outcome.append(exc)

    canceller = threading.Thread(target=cancel_queued)
    ended = manager._ended

    def cancel_when_a_ends(job_id: str) -> None:  # in the worker, between two jobs
        ended(job_id)
        if job_id == running.id:
            store.gate.clear()
            canceller.start()
            store.stalled.wait(10)  # the cancel is being written

    monkeypatch.setattr(manager, "_ended", cancel_when_a_ends)
    manager.start()
    try:
        wait_state(manager, running.id, TRAINING)
        runner.release.set()
        with watch:  # the worker waits (right) or starts b (wrong): whichever comes first
            watch.wait_for(
                lambda: watch.held_back or manager._jobs[queued.id].state != QUEUED, timeout=10
            )
        assert store.stalled.is_set(), "the cancel never wrote to the store"
        assert manager.get(queued.id).state == QUEUED and watch.held_back
        store.gate.set()
        canceller.join(10)
        assert outcome == [CANCELLED]
        job = jobs_in_store(manager)[queued.id]
        assert job.state == CANCELLED and LOADING_DATA not in job.entered
        later = manager.submit(request("c"))
        wait_state(manager, later.id, SUCCEEDED)
        assert runner.started == ["a", "c"]
    finally:
        store.gate.set()
        runner.release.set()
        manager.stop()


def test_a_refusal_by_the_store_fails_the_job_with_its_reason_not_as_internal(
    jobs: JobStore,
) -> None:
    """A domain error (here the store refusing the trainer's identity) is the job's reason, as
    it is: not an "internal error" with a traceback."""

    class RefusedRunner(ScriptedRunner):
        def run(self, job: JobRecord, context: JobContext) -> None:
            raise AccessDenied("the object store refused to let 'refit-trainer' delete s3://x/y")

    manager = JobManager(jobs, RefusedRunner())
    manager.start()
    try:
        job = manager.submit(request("refused"))
        ended = wait_state(manager, job.id, FAILED, "SUCCEEDED")
    finally:
        manager.stop()
    assert ended.state == FAILED
    assert ended.error == "the object store refused to let 'refit-trainer' delete s3://x/y"
