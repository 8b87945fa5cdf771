"""Many WatchJob callers against real servers on free ports: two service replicas and a trainer
(scripted runner). Issue 23: about 30 watchers (predict role) took every trainer thread, its
health check included, because each watcher held a trainer stream of its own."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from refit.storage import StorageSettings
from refit.v1 import refit_pb2 as pb
from refit.v1 import refit_pb2_grpc
from service.server import RefitServer
from tests.service.conftest import PREDICT_TOKEN, connect, offline_settings, start_service
from tests.trainer.jobs.test_manager import ScriptedRunner
from trainer.jobs.context import JobContext
from trainer.jobs.records import PUBLISHING, TRAINING, JobCancelled, JobRecord
from trainer.jobs.settings import TrainerSettings
from trainer.server import TrainerServer, build_server

WATCHERS_PER_REPLICA = 20
REPLICAS = 2
BATCHES = 3


class ProgressRunner(ScriptedRunner):
    """Trains until released, then reports ``BATCHES`` progress events and publishes."""

    def run(self, job: JobRecord, context: JobContext) -> None:
        self.started.append(job.model)
        context.update(version="1")
        context.set_state(TRAINING)
        while not self.release.wait(0.01):
            if context.cancelled():
                raise JobCancelled("training cancelled in epoch 1")
        for batch in range(1, BATCHES + 1):
            progress = {"epoch": 1, "epochs": 1, "batch": batch, "batches": BATCHES}
            context.progress(progress, persist=False)
        context.set_state(PUBLISHING)


@pytest.fixture
def runner() -> ProgressRunner:
    return ProgressRunner()


@pytest.fixture
def trainer(tmp_path: Path, runner: ProgressRunner) -> Iterator[TrainerServer]:
    storage = StorageSettings(data_dir=tmp_path / "trainer")
    server = build_server(
        TrainerSettings(grpc_address="127.0.0.1:0", health_address="127.0.0.1:0", storage=storage),
        runner,
    )
    server.start()
    yield server
    runner.release.set()
    server.stop(grace_s=1)


@pytest.fixture
def services(trainer: TrainerServer, tmp_path: Path) -> Iterator[list[RefitServer]]:
    replicas = []
    try:
        for replica in range(REPLICAS):
            settings = offline_settings(
                tmp_path / f"service{replica}",
                trainer_address=f"127.0.0.1:{trainer.port}",
                workers=64,  # room for every watcher at the service: the trainer is under test
                max_streams=WATCHERS_PER_REPLICA + 8,
            )
            replicas.append(start_service(settings, wait_ready=False))
        yield replicas
    finally:
        for refit in replicas:
            refit.stop(grace_s=1)


class Watch:
    """One WatchJob call read on its own thread: its events, or the error that ended it."""

    def __init__(self, api: refit_pb2_grpc.RefitStub, job_id: str) -> None:
        self.call = api.WatchJob(pb.WatchJobRequest(id=job_id), timeout=60)
        self.events: list[pb.JobEvent] = []
        self.error: grpc.RpcError | None = None
        self.started = threading.Event()  # first event, or the error
        self.thread = threading.Thread(target=self._read)
        self.thread.start()

    def _read(self) -> None:
        try:
            for event in self.call:
                self.events.append(event)
                self.started.set()
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            self.started.set()

    def states(self) -> list[int]:
        states = [e.job.state for e in self.events]
        return [s for i, s in enumerate(states) if i == 0 or states[i - 1] != s]


class HealthProbe:
    """Checks health on ``port`` back to back on its own thread, as a kubelet does (more often),
    until stopped: each answer must be SERVING within 1 s."""

    def __init__(self, port: int) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.seconds: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._probe)
        self._thread.start()

    def _probe(self) -> None:
        stub = health_pb2_grpc.HealthStub(self.channel)
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if answer.status != health_pb2.HealthCheckResponse.SERVING:
                    self.failures.append(
                        health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
                    )
            except grpc.RpcError as exc:
                self.failures.append(f"{exc.code().name}: {exc.details()}")
            self.seconds.append(time.monotonic() - started)
            self._stop.wait(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.channel.close()


def test_forty_watchers_share_one_trainer_stream_per_replica(trainer, services, runner) -> None:
    with connect(services[0].port) as admin:
        job = refit_pb2_grpc.RefitStub(admin).Retrain(
            pb.RetrainRequest(model="watched", dataset_uri="s3://data/watched"), timeout=10
        )
    channels = [connect(refit.port, PREDICT_TOKEN) for refit in services]
    probe = HealthProbe(trainer.health_port)
    try:
        apis = [refit_pb2_grpc.RefitStub(channel) for channel in channels]
        watches = [Watch(api, job.id) for api in apis for _ in range(WATCHERS_PER_REPLICA)]
        for watch in watches:
            assert watch.started.wait(30)
        refused = [w.error for w in watches if w.error is not None]
        assert not refused, f"{len(refused)} watchers refused: {refused[0].details()}"
        assert trainer.streams.active == REPLICAS  # one subscription per service replica
        runner.release.set()
        for watch in watches:
            watch.thread.join(30)
    finally:
        probe.stop()
        for channel in channels:
            channel.close()
    assert not probe.failures, probe.failures[:3]
    assert len(probe.seconds) >= 2 and max(probe.seconds) < 1.0
    for watch in watches:
        assert watch.error is None, watch.error.details()
        assert watch.events[0].kind == "snapshot"
        assert watch.states()[-2:] == [pb.PUBLISHING, pb.SUCCEEDED]
        batches = [e.job.progress.batch for e in watch.events if e.kind == "progress"]
        assert batches == list(range(1, BATCHES + 1))


def test_an_ended_job_gets_its_record_and_an_unknown_one_not_found(trainer, services) -> None:
    with connect(services[0].port) as admin:
        api = refit_pb2_grpc.RefitStub(admin)
        job = api.Retrain(pb.RetrainRequest(model="gone", dataset_uri="s3://data/gone"), timeout=10)
        api.CancelJob(pb.CancelJobRequest(id=job.id), timeout=10)  # it stops at its next batch
        final = list(api.WatchJob(pb.WatchJobRequest(id=job.id), timeout=10))[-1]
        assert final.job.state == pb.CANCELLED
    with connect(services[1].port, PREDICT_TOKEN) as channel:
        api = refit_pb2_grpc.RefitStub(channel)
        events = list(api.WatchJob(pb.WatchJobRequest(id=job.id), timeout=10))
        assert [(e.kind, e.job.state) for e in events] == [("snapshot", pb.CANCELLED)]
        with pytest.raises(grpc.RpcError) as caught:
            list(api.WatchJob(pb.WatchJobRequest(id="job-20000101T000000-00000000"), timeout=10))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no job" in caught.value.details()
