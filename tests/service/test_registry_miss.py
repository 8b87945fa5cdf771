"""A storm of unknown names while the object store hangs (issue 23), with a real TorchServe, a
real S3 server behind a proxy that accepts connections and never answers, and real gRPC.

A name the catalog does not know makes the service re-read the registry (it may have been
published since). With the store hanging, at most one re-read is in flight and every caller waits
at most ``service.catalog.MISS_WAIT_S`` (2 s) or its own deadline, then gets UNAVAILABLE "the
model registry could not be read": NOT_FOUND would be a lie (the model may exist). Names the
catalog knows never wait on the store, so Predicts for them go on answering.

Before: the callers queued on a lock, each re-reading the registry in turn while holding it (the
last of 20 waited about 20 store timeouts), and callers that gave up and called again filled the
service's RPC slots: Predicts for known models got RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from local_stack.torchserve import TorchServeProcess
from refit.v1 import refit_pb2 as pb
from refit.v1 import refit_pb2_grpc
from service.server import RefitServer
from tests.conftest import MotoServer, wait_until
from tests.faults import S3FaultProxy
from tests.service.conftest import connect, service_settings, start_service

pytestmark = pytest.mark.integration
CALLERS = 20
STORE_TIMEOUT_S = 2.0  # per store request, no retry: a hung read fails after this
# The service's wait (MISS_WAIT_S, 2 s) plus scheduling slack on the shared 2-core machine.
ANSWER_BOUND_S = 2.0 + 1.5
STORM_S = 10.0


@pytest.fixture
def service(
    moto_server: MotoServer,
    refit_bucket: str,
    torchserve: TorchServeProcess,
    s3_proxy: S3FaultProxy,
) -> Iterator[RefitServer]:
    identity = s3_proxy.behind(moto_server.identity("service", refit_bucket))
    storage = dataclasses.replace(identity, timeout_s=STORE_TIMEOUT_S, retries=0)
    refit = start_service(service_settings(moto_server, refit_bucket, torchserve, storage=storage))
    yield refit
    s3_proxy.restore()
    refit.stop()


def unknown_call(api: refit_pb2_grpc.RefitStub, i: int, image: bytes, timeout: float) -> None:
    if i % 2:
        api.GetModel(pb.GetModelRequest(name=f"unknown-{i}"), timeout=timeout)
    else:
        api.Predict(pb.PredictRequest(image=image, model=f"unknown-{i}"), timeout=timeout)


def timed(call, *args) -> tuple[str, str, float]:
    """(status code name, details, seconds) of one call."""
    start = time.monotonic()
    try:
        call(*args)
        code, details = "OK", ""
    except grpc.RpcError as exc:
        code, details = exc.code().name, exc.details() or ""
    return code, details, time.monotonic() - start


class KnownPredicts:
    """Predicts for the cached default, back to back, every outcome kept."""

    def __init__(self, api: refit_pb2_grpc.RefitStub, image: bytes) -> None:
        self.api, self.image = api, image
        self.stop = threading.Event()
        self.outcomes: Counter[str] = Counter()
        self.slowest = 0.0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        request = pb.PredictRequest(image=self.image, model="imagenet")
        while not self.stop.is_set():
            code, _, seconds = timed(self.api.Predict, request, 10)
            self.outcomes[code] += 1
            self.slowest = max(self.slowest, seconds)

    def __enter__(self) -> KnownPredicts:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


def test_unknown_names_while_the_store_hangs_answer_unavailable_in_bounded_time(
    service: RefitServer, s3_proxy: S3FaultProxy, cat_jpeg: bytes
) -> None:
    with connect(service.port) as channel:
        api = refit_pb2_grpc.RefitStub(channel)
        api.Predict(pb.PredictRequest(image=cat_jpeg, model="imagenet"), timeout=30)
        s3_proxy.hang()
        try:
            # The last registry read may be under MISS_REFRESH_INTERVAL_S (1 s) old: misses
            # answer NOT_FOUND from it until the service sees its view as stale.
            def stale() -> bool:
                return timed(unknown_call, api, 1, cat_jpeg, 0.5)[0] != "NOT_FOUND"

            wait_until(stale, 30, "unknown names no longer NOT_FOUND")
            with KnownPredicts(api, cat_jpeg) as known:
                # 20 callers at once, patient ones (60 s deadline): how long does each wait?
                with ThreadPoolExecutor(CALLERS) as pool:
                    answers = list(
                        pool.map(
                            lambda i: timed(unknown_call, api, i, cat_jpeg, 60), range(CALLERS)
                        )
                    )
                # Then impatient ones for STORM_S: each gives up after 3 s and calls again.
                codes: list[str] = []
                end = time.monotonic() + STORM_S

                def impatient(i: int) -> None:
                    while time.monotonic() < end:
                        codes.append(timed(unknown_call, api, i, cat_jpeg, 3)[0])

                with ThreadPoolExecutor(CALLERS) as pool:
                    list(pool.map(impatient, range(CALLERS)))
        finally:
            s3_proxy.restore()
    storm = Counter(codes)
    waits = sorted(seconds for _, _, seconds in answers)
    print(f"\n{CALLERS} unknown names: waits {waits[0]:.1f}..{waits[-1]:.1f}s; "
          f"storm {dict(storm)}; known Predicts {dict(known.outcomes)}, "
          f"slowest {known.slowest:.1f}s")  # fmt: skip
    for code, details, seconds in answers:
        assert code == "UNAVAILABLE", (code, details)
        assert details.startswith("the model registry could not be read"), details
        assert seconds <= ANSWER_BOUND_S, waits
    assert set(storm) == {"UNAVAILABLE"}, storm
    assert set(known.outcomes) == {"OK"} and known.outcomes["OK"] >= 5, known.outcomes
