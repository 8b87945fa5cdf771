"""The job queue with a scripted runner (the real one trains: tests/service/test_retrain.py):
order, one job at a time, one active job per model, cancellation, durability and recovery."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

import grpc
import pytest

from refit.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from refit.storage import AccessDenied, FileStore, StoreUnreachable
from trainer.jobs import manager as manager_module
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


# --- findings: races, locks and bounds ------------------------------------------------------------


def test_a_cancel_between_the_workers_pop_and_its_start_is_not_lost(
    jobs: JobStore, runner: ScriptedRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker pops a job, then starts it: a cancel in between used to raise ValueError
    (list.remove on a job no longer queued), so the client got INTERNAL and the cancel was lost."""
    manager = JobManager(jobs, runner)
    outcome: list = []
    bound = manager_module.logs.bound

    @contextlib.contextmanager
    def cancel_first(var, value):  # runs in the worker right after the pop
        try:
            outcome.append(manager.cancel(value).state)
        except Exception as exc:
            outcome.append(exc)
        with bound(var, value):
            yield

    monkeypatch.setattr(manager_module.logs, "bound", cancel_first)
    job = manager.submit(request("a"))
    manager.start()
    try:
        assert wait_state(manager, job.id, CANCELLED).error
        assert outcome and not isinstance(outcome[0], Exception), outcome
    finally:
        runner.release.set()
        manager.stop()


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


def test_a_running_job_says_what_it_waits_for(manager, runner) -> None:
    job = manager.submit(request("a"))
    wait_state(manager, job.id, TRAINING)
    events = manager.follow(job.id, lambda: True)
    next(events)
    JobContext(manager, job.id, threading.Event()).detail("waiting for TorchServe")
    kind, record = next(events)
    assert kind == "detail" and record.detail == "waiting for TorchServe"
    assert manager.get(job.id).detail == "waiting for TorchServe"
    assert jobs_in_store(manager)[job.id].detail == "waiting for TorchServe"
    runner.release.set()
    assert wait_state(manager, job.id, SUCCEEDED).detail == ""


def jobs_in_store(manager: JobManager) -> dict[str, JobRecord]:
    return {r.id: r for r in manager.store.load_all()}


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
