"""The trainer's internal gRPC API over a real socket, with a scripted job runner (real training
through this API runs in tests/service/test_retrain.py)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from refit.storage import StorageSettings
from refit.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from refit.v1 import refit_pb2 as pb
from tests.trainer.jobs.test_manager import ScriptedRunner
from trainer.jobs.settings import TrainerSettings
from trainer.server import TrainerServer, build_server


@pytest.fixture
def runner() -> ScriptedRunner:
    return ScriptedRunner(fail=("broken",))


@pytest.fixture
def trainer(tmp_path: Path, runner: ScriptedRunner) -> Iterator[TrainerServer]:
    storage = StorageSettings(data_dir=tmp_path)  # FileStore: the embedded backend
    settings = TrainerSettings(grpc_address="127.0.0.1:0", storage=storage)
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


def test_submit_watch_and_get(stub, runner) -> None:
    job = submit(stub, "a")
    assert job.state == pb.QUEUED and job.model == "a" and job.id.startswith("job-")
    assert job.request.hyperparameters.epochs == 2 and job.request.hyperparameters.freeze == -1
    stream = stub.WatchJob(pb.WatchJobRequest(id=job.id), timeout=30)
    first = next(stream)
    assert first.kind == "snapshot" and first.job.id == job.id
    runner.release.set()
    states = [e.job.state for e in stream]
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


def test_subscribe_sees_every_jobs_state_changes(stub, runner) -> None:
    stream = stub.Subscribe(trainer_pb2.SubscribeRequest(), timeout=30)
    seen: list[tuple[str, int]] = []
    first_seen = threading.Event()

    def read() -> None:
        for event in stream:
            seen.append((event.job.model, event.job.state))
            first_seen.set()
            if event.job.model == "broken" and event.job.state == pb.FAILED:
                return

    reader = threading.Thread(target=read)
    reader.start()
    runner.release.set()
    # The server subscribes only once it runs the call: submit throwaway jobs until the reader
    # sees one, so "a" is surely submitted after the subscription began.
    for attempt in range(50):
        submit(stub, f"prime{attempt}")
        if first_seen.wait(0.1):
            break
    submit(stub, "a")
    submit(stub, "broken")
    reader.join(20)
    stream.cancel()
    assert ("a", pb.SUCCEEDED) in seen and ("broken", pb.FAILED) in seen
    assert all(kind != pb.JOB_STATE_UNSPECIFIED for _, kind in seen)


def test_health_is_serving(stub, trainer: TrainerServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{trainer.port}") as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
