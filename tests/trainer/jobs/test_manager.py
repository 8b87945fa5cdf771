"""The job queue with a scripted runner (the real one trains: tests/service/test_retrain.py):
one active job per model, cancellation, listing, bounds, durability and recovery. Running the
queue: test_queue_worker.py."""

from __future__ import annotations

import threading

import grpc
import pytest

from refit.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from tests.trainer.jobs.fakes import FaultyStore, ScriptedRunner, jobs_in_store, request, wait_state
from trainer.jobs.manager import JobManager
from trainer.jobs.records import (
    CANCELLED,
    FAILED,
    LOADING_DATA,
    PUBLISHING,
    QUEUED,
    SUCCEEDED,
    TRAINING,
    JobRecord,
    JobStore,
)


def test_one_active_job_per_model(manager, runner) -> None:
    first = manager.submit(request("a"))
    with pytest.raises(AlreadyExists) as caught:
        manager.submit(request("a"))
    assert first.id in caught.value.message
    runner.release.set()
    wait_state(manager, first.id, SUCCEEDED)
    manager.submit(request("a"))  # the model's job ended: a new one may start


def test_invalid_request_is_refused_before_queueing(manager) -> None:
    with pytest.raises(InvalidArgument):
        manager.submit({"model": "a", "dataset_uri": "/tmp/x"})
    assert manager.list() == []


def test_cancel_queued_and_running_jobs(manager, runner) -> None:
    running, queued = manager.submit(request("a")), manager.submit(request("b"))
    wait_state(manager, running.id, TRAINING)
    assert manager.cancel(queued.id).state == CANCELLED
    manager.cancel(running.id)
    job = wait_state(manager, running.id, CANCELLED)
    assert "cancelled" in job.error and runner.abandoned == [running.id]
    with pytest.raises(FailedPrecondition):
        manager.cancel(running.id)
    with pytest.raises(NotFound):
        manager.cancel("job-nope")
    assert runner.started == ["a"]


def test_list_filters_and_orders_newest_first(manager, runner) -> None:
    runner.release.set()
    ids = [manager.submit(request(m)).id for m in ("a", "b")]
    for job_id in ids:
        wait_state(manager, job_id, SUCCEEDED)
    broken = wait_state(manager, manager.submit(request("broken")).id, FAILED)
    assert [j.id for j in manager.list()] == [broken.id, *reversed(ids)]
    assert [j.id for j in manager.list(model="a")] == [ids[0]]
    assert [j.id for j in manager.list(states=(FAILED,))] == [broken.id]
    assert len(manager.list(limit=2)) == 2


def test_restart_resumes_interrupted_jobs_first_then_queued_ones(jobs: JobStore) -> None:
    first = ScriptedRunner()
    before = JobManager(jobs, first)
    before.start()
    running = before.submit(request("a"))
    wait_state(before, running.id, TRAINING)
    queued = before.submit(request("b"))
    before.stop()  # like a kill: the running job's record still says TRAINING
    assert jobs.load_all()[0].state == TRAINING

    second = ScriptedRunner()
    after = JobManager(jobs, second)
    after.start()
    try:
        resumed = wait_state(after, running.id, TRAINING)
        assert resumed.attempts == 2 and resumed.version == "1"
        assert after.get(queued.id).state == QUEUED and second.started == ["a"]
        second.release.set()
        wait_state(after, queued.id, SUCCEEDED)
        assert second.started == ["a", "b"]
    finally:
        second.release.set()
        after.stop()


def test_a_job_interrupted_too_often_fails_with_a_reason(jobs: JobStore) -> None:
    record = JobRecord(id="job-x", model="a", request=request("a"), state=LOADING_DATA, attempts=3)
    jobs.save(record)
    runner = ScriptedRunner()
    manager = JobManager(jobs, runner, max_attempts=3)
    manager.recover()
    job = manager.get("job-x")
    assert job.state == FAILED and "interrupted 3 times" in job.error
    assert runner.abandoned == ["job-x"] and jobs.load_all()[0].state == FAILED


def test_phase_seconds_come_from_state_entry_times() -> None:
    record = JobRecord(id="j", model="a", request={})
    record.entered = {QUEUED: 0.0, LOADING_DATA: 1.0, TRAINING: 3.0, "EXPORTING": 10.0,
                      PUBLISHING: 11.0, SUCCEEDED: 15.0}  # fmt: skip
    assert record.phase_seconds() == {
        "queue": 1.0, "data": 2.0, "train": 7.0, "export": 1.0, "publish": 4.0,
    }  # fmt: skip


def test_readers_do_not_wait_for_a_stalled_store_write(jobs: JobStore, runner) -> None:
    store = FaultyStore(jobs)
    manager = JobManager(store, runner)
    manager.start()
    try:
        first = manager.submit(request("a"))
        wait_state(manager, first.id, TRAINING)
        store.gate.clear()
        writer = threading.Thread(target=manager.submit, args=(request("b"),))
        writer.start()
        assert store.stalled.wait(10)  # the writer is blocked in save()
        reads: list = []
        reader = threading.Thread(
            target=lambda: reads.extend([manager.get(first.id), manager.list()])
        )
        reader.start()
        reader.join(2)
        assert not reader.is_alive(), "GetJob/ListJobs waited for a store write"
        store.gate.set()
        writer.join(10)
    finally:
        store.gate.set()
        runner.release.set()
        manager.stop()


def test_the_queue_is_bounded(jobs: JobStore, runner) -> None:
    manager = JobManager(jobs, runner, max_queued=2)
    manager.start()
    try:
        running = manager.submit(request("a"))
        wait_state(manager, running.id, TRAINING)
        manager.submit(request("b"))
        manager.submit(request("c"))
        with pytest.raises(Exception) as caught:
            manager.submit(request("d"))
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "REFIT_TRAINER_MAX_QUEUED" in caught.value.message
        assert [j.model for j in manager.list()] == ["c", "b", "a"]
    finally:
        runner.release.set()
        manager.stop()


def test_only_the_newest_ended_jobs_stay_in_memory(jobs: JobStore, runner) -> None:
    manager = JobManager(jobs, runner, history=2)
    manager.start()
    runner.release.set()
    try:
        ids = []
        for model in ("a", "b", "c", "d"):
            ids.append(manager.submit(request(model)).id)
            wait_state(manager, ids[-1], SUCCEEDED)
        assert [j.id for j in manager.list()] == ids[:1:-1]  # the two newest
        assert len(manager._jobs) == 2
        old = manager.get(ids[0])  # read back from the store
        assert old.state == SUCCEEDED and old.model == "a"
        with pytest.raises(FailedPrecondition):
            manager.cancel(ids[0])
        kind, snapshot = next(manager.follow(ids[0], lambda: True))
        assert kind == "snapshot" and snapshot.id == ids[0]
        with pytest.raises(NotFound):
            manager.get("job-20990101T000000-00000000")
    finally:
        manager.stop()


# --- a cancelled queued job stays cancelled (issue 23) -------------------------------------------


@pytest.fixture(params=["file", "s3"])
def durable_jobs(request: pytest.FixtureRequest) -> JobStore:
    """Job records on each real backend: the embedded FileStore, and the S3 test server."""
    if request.param == "file":
        return request.getfixturevalue("jobs")
    return JobStore(request.getfixturevalue("s3_store"), request.getfixturevalue("bucket"))


def test_a_cancelled_queued_job_stays_cancelled_after_a_restart(durable_jobs: JobStore) -> None:
    """The cancel of a queued job used to change memory only: after a restart the job trained."""
    first = ScriptedRunner()
    before = JobManager(durable_jobs, first)
    before.start()
    try:
        running = before.submit(request("a"))
        wait_state(before, running.id, TRAINING)
        queued = before.submit(request("b"))
        assert before.cancel(queued.id).state == CANCELLED
    finally:
        before.stop()  # like a kill: nothing more is written

    second = ScriptedRunner()
    after = JobManager(durable_jobs, second)
    after.start()
    try:
        assert after.get(queued.id).state == CANCELLED
        assert jobs_in_store(after)[queued.id].error == "cancelled while queued"
        second.release.set()
        wait_state(after, running.id, SUCCEEDED)
        later = after.submit(request("c"))  # runs after anything still queued: b, were it
        wait_state(after, later.id, SUCCEEDED)
        assert second.started == ["a", "c"]
    finally:
        second.release.set()
        after.stop()


def test_a_queued_cancel_the_store_refuses_changes_nothing(jobs: JobStore, runner) -> None:
    store = FaultyStore(jobs, affects=lambda record: record.state == CANCELLED)
    manager = JobManager(store, runner)
    manager.start()
    try:
        running = manager.submit(request("a"))
        wait_state(manager, running.id, TRAINING)
        queued, behind = manager.submit(request("b")), manager.submit(request("c"))
        store.refusing = True
        with pytest.raises(Unavailable) as caught:
            manager.cancel(queued.id)
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        message = caught.value.message
        assert "nothing was cancelled" in message and "retry" in message, message
        assert "127.0.0.1:9 is unreachable" in message, message  # the cause, for the operator
        job = manager.get(queued.id)
        assert (job.state, job.error, job.finished_at) == (QUEUED, "", 0.0)
        assert CANCELLED not in job.entered
        assert manager.queue_position(queued.id) == 1 and manager.queue_position(behind.id) == 2
        assert jobs_in_store(manager)[queued.id].state == QUEUED

        store.refusing = False  # the store is back: the retried cancel succeeds
        assert manager.cancel(queued.id).state == CANCELLED
        assert jobs_in_store(manager)[queued.id].state == CANCELLED
        assert manager.queue_position(behind.id) == 1
        runner.release.set()
        wait_state(manager, behind.id, SUCCEEDED)
        assert runner.started == ["a", "c"]
    finally:
        store.gate.set()
        runner.release.set()
        manager.stop()
