"""What GetJob and WatchJob of a finished job cost the object store: the job record answers them,
not a re-read of the registry (issue 23: ~160 requests a call for 20 models x 5 versions).

The service and a trainer with a scripted runner run on free ports; the service's store is the
embedded FileStore behind a wrapper that counts every call made to it from the threads that
serve RPCs (the reconciler's and the job subscription's own reads are not the calls' cost)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from refit.registry import Registry
from refit.storage import ObjectStore, StorageSettings
from refit.v1 import refit_pb2 as pb
from refit.v1 import refit_pb2_grpc
from service.catalog import ModelCatalog
from service.server import RefitServer
from tests.service.conftest import (
    PREDICT_TOKEN,
    connect,
    offline_settings,
    publish_records,
    start_service,
)
from tests.trainer.jobs.test_manager import ScriptedRunner
from trainer.jobs.settings import TrainerSettings
from trainer.server import TrainerServer, build_server

MODELS = {f"m{i:02d}": [str(v) for v in range(1, 6)] for i in range(20)}  # 20 models x 5
CALLS = 20


class CountingStore:
    """Forwards to a real store and counts each call by the name of the thread that made it."""

    def __init__(self, store: ObjectStore, calls: Counter) -> None:
        self._store = store
        self._calls = calls

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._store, name)
        if not callable(attribute):
            return attribute

        def counted(*args: Any, **kwargs: Any) -> Any:
            self._calls[threading.current_thread().name] += 1
            return attribute(*args, **kwargs)

        return counted


@dataclass(frozen=True)
class CountingStorage(StorageSettings):
    calls: Counter = field(default_factory=Counter, compare=False, repr=False)

    def open(self) -> ObjectStore:
        return CountingStore(super().open(), self.calls)  # type: ignore[return-value]


@pytest.fixture
def trainer(tmp_path: Path) -> Iterator[TrainerServer]:
    runner = ScriptedRunner()
    runner.release.set()  # every job runs straight through to SUCCEEDED, version "1"
    storage = StorageSettings(data_dir=tmp_path / "trainer")
    server = build_server(
        TrainerSettings(grpc_address="127.0.0.1:0", health_address="127.0.0.1:0", storage=storage),
        runner,
    )
    server.start()
    yield server
    server.stop(grace_s=1)


@pytest.fixture
def storage(tmp_path: Path) -> CountingStorage:
    publish_records(tmp_path / "service", MODELS)
    return CountingStorage(data_dir=tmp_path / "service")


@pytest.fixture
def service(
    trainer: TrainerServer, storage: CountingStorage, tmp_path: Path
) -> Iterator[RefitServer]:
    settings = offline_settings(
        tmp_path / "service",
        storage=storage,
        trainer_address=f"127.0.0.1:{trainer.port}",
        # No background pass may read the registry while the test counts.
        watch_interval_s=3600.0,
        reconcile_retry_s=3600.0,
        reconcile_retry_max_s=3600.0,
    )
    refit = start_service(settings, wait_ready=False)
    yield refit
    refit.stop(grace_s=1)


def finished_job(service: RefitServer, model: str) -> pb.Job:
    with connect(service.port) as channel:
        api = refit_pb2_grpc.RefitStub(channel)
        job = api.Retrain(pb.RetrainRequest(model=model, dataset_uri=f"s3://data/{model}"))
        final = list(api.WatchJob(pb.WatchJobRequest(id=job.id), timeout=30))[-1].job
    assert final.state == pb.SUCCEEDED and final.version == "1", final
    return final


def rpc_calls(storage: CountingStorage) -> int:
    """Store calls made by the service's gRPC server threads (service/server.py names them)."""
    return sum(n for thread, n in storage.calls.items() if thread.startswith("grpc_"))


def cost(storage: CountingStorage, calls: Callable[[], object]) -> int:
    before = rpc_calls(storage)
    calls()
    return rpc_calls(storage) - before


def refresh_cost(tmp_path: Path) -> int:
    """Store calls of one registry read (a catalog refresh) of the test's registry."""
    calls: Counter = Counter()
    store = CountingStore(StorageSettings(data_dir=tmp_path / "service").open(), calls)
    ModelCatalog(Registry(store, "refit")).refresh()
    return sum(calls.values())


def test_get_job_of_a_finished_job_does_not_reread_the_registry(
    service, storage, tmp_path: Path
) -> None:
    job = finished_job(service, "m00")  # m00 v1 is in the registry: the catalog knows it
    registry = refresh_cost(tmp_path)
    assert registry >= 100  # 20 models x 5 versions: one read of each record at least

    with connect(service.port, PREDICT_TOKEN) as channel:
        api = refit_pb2_grpc.RefitStub(channel)
        request = pb.GetJobRequest(id=job.id)
        spent = cost(storage, lambda: [api.GetJob(request, timeout=10) for _ in range(CALLS)])
        assert spent < registry, f"{CALLS} GetJob calls cost {spent} store calls"

        watch = pb.WatchJobRequest(id=job.id)
        spent = cost(storage, lambda: [list(api.WatchJob(watch, timeout=10)) for _ in range(CALLS)])
        assert spent < registry, f"{CALLS} WatchJob calls cost {spent} store calls"


def test_an_unknown_version_rereads_the_registry_at_most_once_a_second(
    service, storage, tmp_path: Path
) -> None:
    # A model the registry does not hold: its job's version is unknown to the catalog, so each
    # call takes the catalog's throttled miss path.
    job = finished_job(service, "elsewhere")
    registry = refresh_cost(tmp_path)
    with connect(service.port, PREDICT_TOKEN) as channel:
        api = refit_pb2_grpc.RefitStub(channel)
        spent = cost(
            storage,
            lambda: [api.GetJob(pb.GetJobRequest(id=job.id), timeout=10) for _ in range(CALLS)],
        )
    assert spent <= 3 * registry, f"{CALLS} GetJob calls cost {spent} store calls"


def test_get_job_of_an_unknown_id_is_not_found(service) -> None:
    with connect(service.port, PREDICT_TOKEN) as channel:
        api = refit_pb2_grpc.RefitStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            api.GetJob(pb.GetJobRequest(id="job-20000101T000000-00000000"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
