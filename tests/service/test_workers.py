"""Workers only for what serves (issue 14 item 5), through a real TorchServe and real gRPC.

MODEL has three versions of imagenet v1's archive: v1 the default, v2 and v3 not. The service
registers v1 with a worker and the others without; a Predict naming v2 starts its worker (one
start however many calls arrive at once) and answers as v1 does; idle for REFIT_IDLE_WORKER_S
(small here), v2 goes back to 0 workers while v1 keeps its own; a TorchServe restart comes back
in the same state. A reconcile pass where nothing changed calls TorchServe only to look.

TorchServe here is this module's own, so its describe answers show this module's versions only.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client import REGISTRY

from local_stack.torchserve import TorchServeProcess
from refit.registry import Registry
from refit.storage import S3Store
from refit.torchserve import TorchServeClient
from refit.v1 import refit_pb2 as pb
from refit.v1 import refit_pb2_grpc
from service.catalog import ModelCatalog
from service.reconciler import Reconciler
from service.server import RefitServer
from tests.conftest import MotoServer, wait_until
from tests.faults import S3FaultProxy
from tests.service.conftest import (
    add_version_of,
    bucket_with_imagenet_archive,
    connect,
    service_settings,
    start_service,
    torchserve_process,
)

pytestmark = pytest.mark.integration
MODEL = f"workers-{uuid.uuid4().hex[:6]}"
IDLE_S = 6.0
CONCURRENT = 6


@pytest.fixture(scope="module")
def own_torchserve(
    tmp_path_factory: pytest.TempPathFactory, moto_server: MotoServer, s3_proxy: S3FaultProxy
) -> Iterator[TorchServeProcess]:
    with torchserve_process(
        tmp_path_factory, "torchserve-workers", moto_server, s3_proxy
    ) as process:
        yield process


@pytest.fixture(scope="module")
def bucket(moto_server: MotoServer, refit_bucket: str) -> tuple[S3Store, str]:
    store, name, source = bucket_with_imagenet_archive(moto_server, refit_bucket, "workers")
    for version in ("1", "2", "3"):
        add_version_of(store, name, source, MODEL, version)
    Registry(store, name).set_default(MODEL, "1")
    return store, name


@pytest.fixture(scope="module")
def service(
    moto_server: MotoServer, bucket: tuple[S3Store, str], own_torchserve: TorchServeProcess
) -> Iterator[RefitServer]:
    settings = service_settings(
        moto_server,
        bucket[1],
        own_torchserve,
        idle_worker_s=IDLE_S,
        candidate_warm_s=0.0,  # the records were written just now: no candidate grace here
        watch_interval_s=0.5,
    )
    refit = start_service(settings)
    yield refit
    refit.stop()


@pytest.fixture(scope="module")
def api(service: RefitServer) -> Iterator[refit_pb2_grpc.RefitStub]:
    with connect(service.port) as channel:
        yield refit_pb2_grpc.RefitStub(channel)


def describe(process: TorchServeProcess, version: str = "") -> dict:
    """TorchServe's own answer (REST describe); no version: its default version."""
    return process.describe(MODEL, version)


def workers(process: TorchServeProcess) -> dict[str, int]:
    return {v: len(describe(process, v)["workers"]) for v in ("1", "2", "3")}


def scale_ups(outcome: str = "ok") -> float:
    value = REGISTRY.get_sample_value("refit_worker_scale_ups_total", {"outcome": outcome})
    return value or 0.0


def idle_scale_downs() -> float:
    labels = {"reason": "idle", "outcome": "ok"}
    return REGISTRY.get_sample_value("refit_worker_scale_downs_total", labels) or 0.0


def test_only_the_default_has_a_worker(service: RefitServer, own_torchserve) -> None:
    assert workers(own_torchserve) == {"1": 1, "2": 0, "3": 0}
    assert describe(own_torchserve)["modelVersion"] == "1"  # TorchServe's default


def test_concurrent_first_calls_start_one_worker_and_are_answered(
    api: refit_pb2_grpc.RefitStub, own_torchserve: TorchServeProcess, cat_jpeg: bytes
) -> None:
    expected = api.Predict(pb.PredictRequest(image=cat_jpeg, model=MODEL), timeout=60)
    before = scale_ups()

    def ask(_: int) -> pb.PredictResponse:
        request = pb.PredictRequest(image=cat_jpeg, model=MODEL, version="2")
        return api.Predict(request, timeout=120)

    with ThreadPoolExecutor(CONCURRENT) as pool:
        answers = list(pool.map(ask, range(CONCURRENT)))
    assert scale_ups() - before == 1
    for answer in answers:
        assert answer.version == "2"
        assert [p.index for p in answer.predictions] == [p.index for p in expected.predictions]
    assert workers(own_torchserve) == {"1": 1, "2": 1, "3": 0}
    assert REGISTRY.get_sample_value("refit_worker_scale_up_seconds_count") >= 1


def test_an_idle_version_goes_back_to_0_workers_and_the_default_keeps_its_own(
    own_torchserve: TorchServeProcess,
) -> None:
    waited = wait_until(
        lambda: workers(own_torchserve)["2"] == 0, IDLE_S + 20, "v2 back to 0 workers"
    )
    assert waited <= IDLE_S + 20
    assert workers(own_torchserve) == {"1": 1, "2": 0, "3": 0}
    # TorchServe reports 0 workers before its answer reaches the service, which counts then.
    wait_until(lambda: idle_scale_downs() >= 1, 10, "the scale-down counted")


def test_a_pass_where_nothing_changed_only_looks(
    bucket: tuple[S3Store, str], own_torchserve: TorchServeProcess
) -> None:
    """TorchServe 0.12's describe never says which version is the default: the reconciler used
    to call SetDefault for every model on every pass."""
    store, name = bucket
    calls: Counter[str] = Counter()
    ports = own_torchserve.ports
    client = TorchServeClient(
        f"127.0.0.1:{ports.grpc_inference}",
        f"127.0.0.1:{ports.grpc_management}",
        observe=lambda call, seconds, error: calls.update([call]),
        keys=own_torchserve.key_source(),
    )
    try:
        reconciler = Reconciler(ModelCatalog(Registry(store, name)), store, name, client)
        reconciler.run_once()
        calls.clear()
        reconciler.run_once()
    finally:
        client.close()
    assert dict(calls) == {"list_models": 1, "describe_model": 1}


def test_a_restarted_torchserve_comes_back_in_the_same_state(
    service: RefitServer,
    api: refit_pb2_grpc.RefitStub,
    own_torchserve: TorchServeProcess,
    cat_jpeg: bytes,
) -> None:
    own_torchserve.stop()
    own_torchserve.start()

    def restored() -> bool:
        try:
            return workers(own_torchserve) == {"1": 1, "2": 0, "3": 0}
        except OSError:  # not registered yet: TorchServe answers 404
            return False

    wait_until(restored, 120, "the versions registered again")
    assert describe(own_torchserve)["modelVersion"] == "1"
    answer = api.Predict(pb.PredictRequest(image=cat_jpeg, model=MODEL, version="3"), timeout=120)
    assert answer.version == "3" and 281 <= answer.predictions[0].index <= 285
