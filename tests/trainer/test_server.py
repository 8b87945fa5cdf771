"""The trainer's internal gRPC API over a real socket, with a scripted job runner (real training
through this API runs in tests/service/test_retrain.py): jobs, the Subscribe stream, the cap on
streams, and health on a server of its own."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from refit.errors import Unavailable
from refit.storage import FileStore, StorageSettings
from refit.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from refit.v1 import refit_pb2 as pb
from tests.trainer.jobs.test_manager import ScriptedRunner
from trainer.jobs import events as event_log
from trainer.jobs.context import JobContext
from trainer.jobs.manager import JobManager
from trainer.jobs.records import JobRecord, JobStore
from trainer.jobs.settings import TrainerSettings
from trainer.server import TrainerServer, build_server


class ReportingRunner(ScriptedRunner):
    """Says what it does and reports a batch before training: detail and progress events."""

    def run(self, job: JobRecord, context: JobContext) -> None:
        context.detail("reading the dataset")
        context.progress({"epoch": 1, "epochs": 2, "batch": 1, "batches": 4}, persist=False)
        super().run(job, context)


@pytest.fixture
def runner() -> ScriptedRunner:
    return ReportingRunner(fail=("broken",))


@pytest.fixture
def trainer(tmp_path: Path, runner: ScriptedRunner) -> Iterator[TrainerServer]:
    storage = StorageSettings(data_dir=tmp_path)  # FileStore: the embedded backend
    settings = TrainerSettings(
        grpc_address="127.0.0.1:0", health_address="127.0.0.1:0", storage=storage
    )
    server = build_server(settings, runner=runner)
    server.start()
    yield server
    runner.release.set()
    server.stop(grace_s=1)


@pytest.fixture
def stub(trainer: TrainerServer) -> Iterator[trainer_pb2_grpc.TrainerStub]:
    with grpc.insecure_channel(f"127.0.0.1:{trainer.port}") as channel:
        yield trainer_pb2_grpc.TrainerStub(channel)


def submit(stub, model: str) -> pb.Job:
    request = pb.RetrainRequest(
        model=model,
        dataset_uri=f"s3://data/{model}",
        hyperparameters=pb.Hyperparameters(epochs=2, freeze=-1),
    )
    return stub.Submit(request, timeout=10)


def events_until(stream, job_id: str, state: int) -> list[pb.JobEvent]:
    """A subscription's events of one job, up to the first in ``state``."""
    events = []
    for message in stream:
        if message.event.job.id == job_id:
            events.append(message.event)
            if message.event.job.state == state:
                return events
    raise AssertionError(f"the subscription ended before job {job_id} was {state}")


def test_submit_subscribe_and_get(stub, runner) -> None:
    job = submit(stub, "a")
    assert job.state == pb.QUEUED and job.model == "a" and job.id.startswith("job-")
    assert job.request.hyperparameters.epochs == 2 and job.request.hyperparameters.freeze == -1
    stream = stub.Subscribe(trainer_pb2.SubscribeRequest(), timeout=30)
    first = next(stream)
    assert first.WhichOneof("item") == "active" and [j.id for j in first.active.jobs] == [job.id]
    runner.release.set()
    states = [e.job.state for e in events_until(stream, job.id, pb.SUCCEEDED)]
    stream.cancel()
    assert states[-2:] == [pb.PUBLISHING, pb.SUCCEEDED]
    done = stub.GetJob(pb.GetJobRequest(id=job.id), timeout=10)
    assert done.state == pb.SUCCEEDED and done.version == "1" and done.attempts == 1
    assert done.created_at.seconds > 0 and done.finished_at.seconds >= done.started_at.seconds
    assert set(done.phase_seconds) == {"queue", "data", "publish"}  # scripted: no export phase


def test_errors_keep_their_codes(stub) -> None:
    job = submit(stub, "a")
    with pytest.raises(grpc.RpcError) as caught:
        submit(stub, "a")
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert job.id in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetJob(pb.GetJobRequest(id="job-nope"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as caught:
        stub.Submit(pb.RetrainRequest(model="b", dataset_uri="/local"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_list_jobs_by_state_and_queue_position(stub, runner) -> None:
    ids = [submit(stub, m).id for m in ("a", "b", "c")]
    queued = stub.ListJobs(pb.ListJobsRequest(states=[pb.QUEUED]), timeout=10).jobs
    assert [j.id for j in queued] == ids[:0:-1]  # newest first: c, b
    assert [j.queue_position for j in queued] == [2, 1]
    cancelled = stub.CancelJob(pb.CancelJobRequest(id=ids[2]), timeout=10)
    assert cancelled.state == pb.CANCELLED
    assert [j.id for j in stub.ListJobs(pb.ListJobsRequest(model="c")).jobs] == [ids[2]]


def test_subscribe_opens_with_the_active_jobs_then_every_event_in_order(stub, runner) -> None:
    running, queued = submit(stub, "a"), submit(stub, "b")
    ended = submit(stub, "c")
    stub.CancelJob(pb.CancelJobRequest(id=ended.id), timeout=10)
    stream = stub.Subscribe(trainer_pb2.SubscribeRequest(), timeout=30)
    active = next(stream).active.jobs
    assert {j.id for j in active} == {running.id, queued.id}  # not the cancelled one
    runner.release.set()
    first = events_until(stream, running.id, pb.SUCCEEDED)
    second = events_until(stream, queued.id, pb.SUCCEEDED)
    stream.cancel()
    for events in (first, second):
        states = [e.job.state for e in events]
        assert states == sorted(states)  # the states' numbers follow a job's life
    # Every kind, not only states: the service's watchers get detail and progress from it.
    kinds = [(e.kind, e.job.detail, e.job.progress.batch) for e in second if e.kind != "state"]
    assert kinds == [("detail", "reading the dataset", 0), ("progress", "reading the dataset", 1)]


def test_subscribe_sees_every_jobs_state_changes(stub, runner) -> None:
    stream = stub.Subscribe(trainer_pb2.SubscribeRequest(), timeout=30)
    assert next(stream).WhichOneof("item") == "active"  # the server runs the call from here on
    runner.release.set()
    submit(stub, "a")
    submit(stub, "broken")
    seen: list[tuple[str, int]] = []
    for message in stream:
        seen.append((message.event.job.model, message.event.job.state))
        if seen[-1] == ("broken", pb.FAILED):
            break
    stream.cancel()
    assert ("a", pb.SUCCEEDED) in seen and ("broken", pb.FAILED) in seen
    assert all(kind != pb.JOB_STATE_UNSPECIFIED for _, kind in seen)


class FirstMessage:
    """Reads a stream's first message on its own thread: the message, or the error instead."""

    def __init__(self, call) -> None:
        self.call = call
        self.message = None
        self.error: grpc.RpcError | None = None
        self.done = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            self.message = next(self.call)
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            self.done.set()


def test_streams_past_the_cap_are_refused_and_unary_calls_keep_their_threads(
    stub, trainer: TrainerServer
) -> None:
    cap = trainer.settings.max_streams
    readers: list[FirstMessage] = []
    try:
        for _ in range(40):  # one after the other: each is refused by the cap, not by a burst
            readers.append(FirstMessage(stub.Subscribe(trainer_pb2.SubscribeRequest(), timeout=30)))
            assert readers[-1].done.wait(10)
        # 40 streams asked for, more than there are threads: unary calls still answer at once.
        started = time.monotonic()
        stub.ListJobs(pb.ListJobsRequest(), timeout=1)
        assert time.monotonic() - started < 1.0
        opened = [r for r in readers if r.message is not None]
        refused = [r.error for r in readers if r.error is not None]
        assert len(opened) == cap and len(refused) == 40 - cap
        assert trainer.streams.active == cap
        for error in refused:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"REFIT_TRAINER_MAX_STREAMS={cap}" in error.details()
    finally:
        for reader in readers:
            reader.call.cancel()


def test_health_answers_on_its_own_port(trainer: TrainerServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{trainer.health_port}") as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    # The job API's port serves no health: a probe there would wait behind job calls again.
    channel = grpc.insecure_channel(f"127.0.0.1:{trainer.port}")
    with channel, pytest.raises(grpc.RpcError) as caught:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_subscriber_too_far_behind_is_told_to_subscribe_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gap in the events would leave the service's watchers waiting for a state they missed:
    the subscription ends with UNAVAILABLE instead, and the service subscribes again."""
    monkeypatch.setattr(event_log, "EVENT_LOG_SIZE", 4)
    store = FileStore(tmp_path / "objects")
    store.ensure_bucket("refit")
    manager = JobManager(JobStore(store, "refit"), ScriptedRunner())  # not started: jobs wait
    active, events = manager.subscribe(lambda: True)
    assert active == []
    for model in ("a", "b", "c", "d", "e"):  # five events; the log keeps the last four
        manager.submit({"model": model, "dataset_uri": f"s3://data/{model}"})
    with pytest.raises(Unavailable, match="fell more than 4 job events behind"):
        next(events)
    active, events = manager.subscribe(lambda: True)  # again: every job is in the snapshot
    assert sorted(j.model for j in active) == ["a", "b", "c", "d", "e"]
