"""A full TorchServe queue is RESOURCE_EXHAUSTED, not a scale-up (issue 23), through a real
TorchServe with a tiny ``job_queue_size`` and batches of one, and the service in front.

TorchServe 0.12 refuses a request with the same "has no worker" answer whether the version runs
no worker or its job queue is full. Flooding the default (which has its worker) with concurrent
Predicts fills its queue: before the fix the refused callers got UNAVAILABLE "(scaled to 0)" and
the service started workers it already had; now they get RESOURCE_EXHAUSTED with the queue's
size, and nothing is scaled. A version whose worker really was stopped behind the service's back
still starts on demand.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from prometheus_client import REGISTRY

from local_stack.torchserve import TorchServePorts, TorchServeProcess, allowed_urls_for
from refit.registry import Registry
from refit.storage import S3Store
from refit.torchserve import TorchServeClient
from refit.v1 import refit_pb2 as pb
from refit.v1 import refit_pb2_grpc
from service.server import RefitServer, build_server
from tests.conftest import MotoServer, free_port
from tests.service.conftest import (
    add_version_of,
    bucket_with_imagenet_archive,
    connect,
    service_settings,
    wait_serving,
)

pytestmark = pytest.mark.integration
MODEL = f"queue-{uuid.uuid4().hex[:6]}"
QUEUE = 2  # TorchServe's job_queue_size here
FLOOD = 24  # concurrent Predicts: far more than one worker and its queue hold


@pytest.fixture(scope="module")
def small_queue_torchserve(
    tmp_path_factory: pytest.TempPathFactory, moto_server: MotoServer
) -> Iterator[TorchServeProcess]:
    ports = TorchServePorts(*(free_port() for _ in range(5)))
    process = TorchServeProcess(
        tmp_path_factory.mktemp("torchserve-queue"),
        ports,
        allowed_urls_for(moto_server.settings.endpoint),
        extra_config={"job_queue_size": QUEUE},
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def bucket(moto_server: MotoServer, refit_bucket: str) -> str:
    store, name, source = bucket_with_imagenet_archive(moto_server, refit_bucket, "queue")
    for version in ("1", "2"):
        add_version_of(store, name, source, MODEL, version)  # no batching: batches of one
    Registry(S3Store(moto_server.settings), name).set_default(MODEL, "1")
    return name


@pytest.fixture(scope="module")
def service(
    moto_server: MotoServer, bucket: str, small_queue_torchserve: TorchServeProcess
) -> Iterator[tuple[RefitServer, list[tuple[str, int]]]]:
    """The service, and every scale call it makes as (version, workers). Its reconciler passes
    come only when woken (a long interval): its view of the workers is what its own moves
    made it, as between two passes."""
    settings = service_settings(
        moto_server,
        bucket,
        small_queue_torchserve,
        reconcile_interval_s=3600.0,
        watch_interval_s=3600.0,
    )
    refit = build_server(settings)
    scales: list[tuple[str, int]] = []
    scale = refit.torchserve.scale

    def counted(model: str, version: str, workers: int, timeout_s: float) -> None:
        if model == MODEL:
            scales.append((version, workers))
        scale(model, version, workers, timeout_s)

    refit.torchserve.scale = counted  # type: ignore[method-assign]
    refit.start(settings.reconcile_interval_s, settings.watch_interval_s)
    try:
        wait_serving(refit.port)
        yield refit, scales
    finally:
        refit.stop()


@pytest.fixture(scope="module")
def api(service: tuple[RefitServer, list]) -> Iterator[refit_pb2_grpc.RefitStub]:
    with connect(service[0].port) as channel:
        yield refit_pb2_grpc.RefitStub(channel)


def scale_ups() -> float:
    total = 0.0
    for outcome in ("ok", "timeout", "failed"):
        labels = {"outcome": outcome}
        total += REGISTRY.get_sample_value("refit_worker_scale_ups_total", labels) or 0.0
    return total


def queue_refusals() -> float:
    labels = {"reason": "queue_full"}
    return REGISTRY.get_sample_value("refit_predict_refusals_total", labels) or 0.0


def workers_of(process: TorchServeProcess, version: str) -> int:
    return len(process.describe(MODEL, version)["workers"])


def outcome(api: refit_pb2_grpc.RefitStub, image: bytes, version: str = "") -> str:
    try:
        api.Predict(pb.PredictRequest(image=image, model=MODEL, version=version), timeout=60)
    except grpc.RpcError as exc:
        return f"{exc.code().name}: {exc.details()}"
    return "OK"


def test_a_flood_past_the_queue_is_resource_exhausted_and_scales_nothing(
    service: tuple[RefitServer, list[tuple[str, int]]],
    api: refit_pb2_grpc.RefitStub,
    small_queue_torchserve: TorchServeProcess,
    cat_jpeg: bytes,
) -> None:
    _, scales = service
    assert outcome(api, cat_jpeg) == "OK"  # the default has its worker
    before, refusals_before = scale_ups(), queue_refusals()
    with ThreadPoolExecutor(FLOOD) as pool:
        outcomes = Counter(pool.map(lambda _: outcome(api, cat_jpeg), range(FLOOD)))
    print(dict(outcomes), "scale calls:", scales)
    refused = f"RESOURCE_EXHAUSTED: TorchServe's queue for {MODEL} v1 is full"
    assert set(outcomes) <= {"OK", f"{refused} (job_queue_size={QUEUE}); retry with backoff"}
    assert outcomes["OK"] >= 1 and outcomes["OK"] < FLOOD  # the queue did fill
    assert scales == []
    assert scale_ups() == before
    assert queue_refusals() - refusals_before == FLOOD - outcomes["OK"]
    assert workers_of(small_queue_torchserve, "1") == 1
    assert outcome(api, cat_jpeg) == "OK"  # the queue drained: served again


def test_a_version_stopped_behind_the_services_back_still_starts_on_demand(
    service: tuple[RefitServer, list[tuple[str, int]]],
    api: refit_pb2_grpc.RefitStub,
    small_queue_torchserve: TorchServeProcess,
    cat_jpeg: bytes,
) -> None:
    """TorchServe's same answer, when the version has no worker: then it is started."""
    _, scales = service
    assert outcome(api, cat_jpeg, "2") == "OK"  # started on demand: the service knows it warm
    ports = small_queue_torchserve.ports
    other = TorchServeClient(
        f"127.0.0.1:{ports.grpc_inference}",
        f"127.0.0.1:{ports.grpc_management}",
        management_rest=f"127.0.0.1:{ports.management}",
        keys=small_queue_torchserve.key_source(),
    )
    try:
        other.scale(MODEL, "2", 0, timeout_s=60)  # as another service replica would
    finally:
        other.close()
    assert workers_of(small_queue_torchserve, "2") == 0
    scales.clear()
    assert outcome(api, cat_jpeg, "2") == "OK"
    assert scales == [("2", 1)]
    assert workers_of(small_queue_torchserve, "2") == 1
