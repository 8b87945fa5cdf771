"""The job queue with a scripted runner (the real one trains: tests/service/test_retrain.py):
order, one job at a time, one active job per model, cancellation, durability and recovery."""

from __future__ import annotations

import threading
import time

import pytest

from refit.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from refit.storage import FileStore
from trainer.jobs.manager import JobContext, JobManager
from trainer.jobs.records import (
    CANCELLED,
    FAILED,
    LOADING_DATA,
    PUBLISHING,
    QUEUED,
    SUCCEEDED,
    TRAINING,
    JobCancelled,
    JobFailed,
    JobRecord,
    JobStore,
)


class ScriptedRunner:
    """Each job trains until released (or cancelled); ``fail`` names models that fail."""

    def __init__(self, fail: tuple[str, ...] = ()) -> None:
        self.fail = fail
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
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = manager.get(job_id)
        if job.state in states:
            return job
        time.sleep(0.01)
    raise AssertionError(f"job stayed {manager.get(job_id).state}, wanted {states}")


@pytest.fixture
def jobs(file_store: FileStore) -> JobStore:
    file_store.ensure_bucket("refit")
    return JobStore(file_store, "refit")


@pytest.fixture
def runner() -> ScriptedRunner:
    return ScriptedRunner(fail=("broken",))


@pytest.fixture
def manager(jobs: JobStore, runner: ScriptedRunner):
    manager = JobManager(jobs, runner)
    manager.start()
    yield manager
    runner.release.set()
    manager.stop()


def test_jobs_run_one_at_a_time_in_submission_order(manager, runner) -> None:
    ids = [manager.submit(request(m)).id for m in ("a", "b", "c")]
    wait_state(manager, ids[0], TRAINING)
    assert manager.queue_position(ids[1]) == 1 and manager.queue_position(ids[2]) == 2
    runner.release.set()
    for job_id in ids:
        assert wait_state(manager, job_id, SUCCEEDED).error == ""
    assert runner.started == ["a", "b", "c"] and runner.max_running == 1


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


def test_a_failing_job_records_its_reason_and_is_cleaned_up(manager, runner) -> None:
    runner.release.set()
    job = wait_state(manager, manager.submit(request("broken")).id, FAILED)
    assert job.error == "broken: no images" and runner.abandoned == [job.id]


def test_follow_yields_snapshot_then_changes_until_the_end(manager, runner) -> None:
    job = manager.submit(request("a"))
    events = manager.follow(job.id, lambda: True)
    kind, first = next(events)  # taken here: the runner holds the job until released below
    seen = [(kind, first.state)]
    follower = threading.Thread(target=lambda: seen.extend((k, r.state) for k, r in events))
    follower.start()
    wait_state(manager, job.id, TRAINING)
    runner.release.set()
    follower.join(10)
    assert seen[0][0] == "snapshot" and first.state not in (PUBLISHING, SUCCEEDED)
    assert seen[-1] == ("state", SUCCEEDED)
    assert [s for _, s in seen][-2:] == [PUBLISHING, SUCCEEDED]


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
