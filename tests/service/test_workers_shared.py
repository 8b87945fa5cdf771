"""Idleness decided from a truth every service replica shares (issue 23), through two real
services (in this process, each on its own port), one real TorchServe and one bucket.

MODEL has v1 (the default) and v2. Predicts for v2 go through the first service only, a few a
second, for several idle periods (REFIT_IDLE_WORKER_S, small here). The second service must
not stop v2's worker while they flow: before the fix it judged idleness from its own Predicts
only and stopped it, and the first's callers paid a cold start or hung until their deadline.
Once the Predicts stop, v2 goes back to 0 workers after the idle time, and neither service
starts it again. Each service's scale calls are counted by a wrapper around its own client.
Last, a third service whose worker budget the default fills refuses a Predict for v2
(RESOURCE_EXHAUSTED) instead of stopping the default to start it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest

from local_stack.torchserve import TorchServeProcess
from refit.registry import Registry
from refit.storage import S3Store
from refit.v1 import refit_pb2 as pb
from refit.v1 import refit_pb2_grpc
from service.server import RefitServer, build_server
from tests.conftest import MotoServer, wait_until
from tests.faults import S3FaultProxy
from tests.service.conftest import (
    add_version_of,
    bucket_with_imagenet_archive,
    connect,
    service_settings,
    torchserve_process,
    wait_serving,
)

pytestmark = pytest.mark.integration
MODEL = f"shared-{uuid.uuid4().hex[:6]}"
IDLE_S = 4.0
TRAFFIC_S = 4 * IDLE_S  # several idle periods of the second service
PACE_S = 0.3  # between the first service's Predicts: ~3 a second
SLOW_S = 1.0  # reported: a Predict that waited for a worker's start, or a busy machine


@dataclass
class ScaleCalls:
    """Wraps one service's TorchServe client: every scale call it makes, as (version, workers)."""

    calls: list[tuple[str, int]] = field(default_factory=list)

    def wrap(self, refit: RefitServer) -> None:
        scale = refit.torchserve.scale

        def counted(model: str, version: str, workers: int, timeout_s: float) -> None:
            if model == MODEL:
                self.calls.append((version, workers))
            scale(model, version, workers, timeout_s)

        refit.torchserve.scale = counted  # type: ignore[method-assign]

    def count(self, version: str, workers: int) -> int:
        return self.calls.count((version, workers))


@dataclass
class Replica:
    refit: RefitServer
    scales: ScaleCalls
    api: refit_pb2_grpc.RefitStub


@pytest.fixture(scope="module")
def own_torchserve(
    tmp_path_factory: pytest.TempPathFactory, moto_server: MotoServer, s3_proxy: S3FaultProxy
) -> Iterator[TorchServeProcess]:
    with torchserve_process(tmp_path_factory, "torchserve-shared", moto_server, s3_proxy) as ts:
        yield ts


@pytest.fixture(scope="module")
def bucket(moto_server: MotoServer, refit_bucket: str) -> str:
    store, name, source = bucket_with_imagenet_archive(moto_server, refit_bucket, "shared")
    for version in ("1", "2"):
        add_version_of(store, name, source, MODEL, version)
    Registry(S3Store(moto_server.settings), name).set_default(MODEL, "1")
    return name


@pytest.fixture(scope="module")
def replicas(
    moto_server: MotoServer, bucket: str, own_torchserve: TorchServeProcess
) -> Iterator[list[Replica]]:
    settings = service_settings(
        moto_server,
        bucket,
        own_torchserve,
        idle_worker_s=IDLE_S,
        candidate_warm_s=0.0,  # the records were written just now: no candidate grace here
        watch_interval_s=0.5,
    )
    started: list[Replica] = []
    channels: list[grpc.Channel] = []
    try:
        for _ in range(2):
            refit = build_server(settings)
            scales = ScaleCalls()
            scales.wrap(refit)  # before its threads start: every call is seen
            refit.start(settings.reconcile_interval_s, settings.watch_interval_s)
            channel = connect(refit.port)
            channels.append(channel)
            started.append(Replica(refit, scales, refit_pb2_grpc.RefitStub(channel)))
        for replica in started:
            wait_serving(replica.refit.port)
        yield started
    finally:
        for channel in channels:
            channel.close()
        for replica in started:
            replica.refit.stop()


def workers_of(process: TorchServeProcess, version: str) -> int:
    return len(process.describe(MODEL, version)["workers"])


def predict_v2(api: refit_pb2_grpc.RefitStub, image: bytes) -> tuple[float, str]:
    """Seconds taken, and "OK" or the status code's name and message."""
    start = time.monotonic()
    try:
        api.Predict(pb.PredictRequest(image=image, model=MODEL, version="2"), timeout=60)
        outcome = "OK"
    except grpc.RpcError as exc:
        outcome = f"{exc.code().name}: {exc.details()}"
    return time.monotonic() - start, outcome


def test_traffic_through_one_service_keeps_the_worker_the_other_would_stop(
    replicas: list[Replica], own_torchserve: TorchServeProcess, cat_jpeg: bytes
) -> None:
    first, second = replicas
    assert workers_of(own_torchserve, "2") == 0
    answers = []
    deadline = time.monotonic() + TRAFFIC_S
    while time.monotonic() < deadline:
        answers.append(predict_v2(first.api, cat_jpeg))
        time.sleep(PACE_S)  # the pace of the traffic, not a wait for a condition
    failed = [outcome for _, outcome in answers if outcome != "OK"]
    slow = {i: round(seconds, 2) for i, (seconds, _) in enumerate(answers) if seconds > SLOW_S}
    print(
        f"{len(answers)} Predicts through the first service in {TRAFFIC_S:.0f}s; the second "
        f"stopped v2 {second.scales.count('2', 0)} times; the first started it "
        f"{first.scales.count('2', 1)} times; calls over {SLOW_S}s (index: seconds): {slow}; "
        f"failed: {failed}"
    )
    assert failed == []
    assert second.scales.count("2", 0) == 0
    assert first.scales.count("2", 0) == 0
    assert first.scales.count("2", 1) == 1  # the first Predict's start, no other
    assert workers_of(own_torchserve, "2") == 1
    # What the second read: TorchServe counted every one of the first's Predicts.
    (counts,) = second.refit.torchserve.inference_counts().values()
    assert counts[(MODEL, "2")] == len(answers)


def test_the_version_goes_idle_once_the_traffic_stops(
    replicas: list[Replica], own_torchserve: TorchServeProcess
) -> None:
    """Right after the traffic of the test above (module order): v2 is still warm."""
    assert workers_of(own_torchserve, "2") == 1
    waited = wait_until(
        lambda: workers_of(own_torchserve, "2") == 0, IDLE_S + 20, "v2 back to 0 workers"
    )
    # Not before the idle time: each service waits IDLE_S from the last use it saw (its own
    # Predict, or the counters moving on one of its passes, which come every IDLE_S/4).
    assert waited >= IDLE_S - IDLE_S / 4 - 0.5
    stops = sum(replica.scales.count("2", 0) for replica in replicas)
    assert stops >= 1
    for replica in replicas:  # both come to see it cold, and neither starts it again
        wait_until(
            lambda r=replica: "2" not in {v for m, v in r.refit.workers.holding() if m == MODEL},
            10,
            "the service's view without v2",
        )
    assert sum(replica.scales.count("2", 1) for replica in replicas) == 1
    assert workers_of(own_torchserve, "2") == 0


def test_a_full_budget_never_stops_the_default_to_start_another_version(
    moto_server: MotoServer,
    bucket: str,
    own_torchserve: TorchServeProcess,
    replicas: list[Replica],
    cat_jpeg: bytes,
) -> None:
    """A third service whose budget (REFIT_MAX_WARM_WORKERS=1) the default's worker fills: a
    Predict for v2 is refused, and the default keeps its worker (before: it was stopped)."""
    assert (workers_of(own_torchserve, "1"), workers_of(own_torchserve, "2")) == (1, 0)
    settings = service_settings(
        moto_server, bucket, own_torchserve, max_warm_workers=1, candidate_warm_s=0.0
    )
    refit = build_server(settings)
    scales = ScaleCalls()
    scales.wrap(refit)
    refit.start(settings.reconcile_interval_s, settings.watch_interval_s)
    try:
        wait_serving(refit.port)
        with connect(refit.port) as channel:
            _, outcome = predict_v2(refit_pb2_grpc.RefitStub(channel), cat_jpeg)
    finally:
        refit.stop()
    assert outcome.startswith(f"RESOURCE_EXHAUSTED: {MODEL} v2 is not started: all 1 warm")
    assert "REFIT_MAX_WARM_WORKERS" in outcome
    assert scales.calls == []
    assert (workers_of(own_torchserve, "1"), workers_of(own_torchserve, "2")) == (1, 0)
