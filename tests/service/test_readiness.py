"""Readiness means "this replica can answer" (issue 23), with a real TorchServe, a real S3 server
behind a fault proxy and the service over real gRPC.

- The object store cut while the service runs: health stays SERVING, Predicts of cached defaults
  answer, GetModel says the registry is stale, `refit_object_store_up` is 0; all back to normal
  when the store answers again. Before: the first pass that could not read the registry cleared
  health (NOT_SERVING) for as long as the store was down.
- The object store down when the service starts: nothing is cached, so the service is not ready
  and a model name gets UNAVAILABLE, not NOT_FOUND; it becomes SERVING once the store answers.
  Before: the service could not start at all (`ensure_bucket` raised).
- TorchServe refusing SetDefault (injected by a gRPC proxy in front of the real TorchServe's
  management API: TorchServe 0.12 refuses it only for a version it does not hold, which a pass
  never asks for except in a race): the replica stays in the rotation and health SERVING, the
  failure is counted and retried. Before: the replica left the rotation, health NOT_SERVING.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from local_stack.torchserve import TorchServeProcess
from refit.v1 import refit_pb2 as pb
from refit.v1 import refit_pb2_grpc
from service.server import RefitServer
from tests.conftest import MotoServer, wait_until
from tests.faults import S3FaultProxy
from tests.service.conftest import connect, service_settings, start_service, wait_serving

pytestmark = pytest.mark.integration
SERVING = health_pb2.HealthCheckResponse.SERVING
INTERVAL_S = 2.0  # the reconcile interval here: a pass at least this often


def health(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    return answer.status


def store_up() -> float | None:
    return REGISTRY.get_sample_value("refit_object_store_up")


def proxied_settings(moto: MotoServer, bucket: str, ts: TorchServeProcess, proxy: S3FaultProxy):
    """The service reading the store through the proxy, with short store timeouts."""
    identity = proxy.behind(moto.identity("service", bucket))
    storage = dataclasses.replace(identity, timeout_s=2.0, retries=0)
    return service_settings(moto, bucket, ts, storage=storage, reconcile_interval_s=INTERVAL_S)


@pytest.fixture
def proxied_service(
    moto_server: MotoServer,
    refit_bucket: str,
    torchserve: TorchServeProcess,
    s3_proxy: S3FaultProxy,
) -> Iterator[RefitServer]:
    refit = start_service(proxied_settings(moto_server, refit_bucket, torchserve, s3_proxy))
    yield refit
    s3_proxy.restore()
    refit.stop()


def test_a_store_outage_keeps_serving_from_the_cache(
    proxied_service: RefitServer, s3_proxy: S3FaultProxy, cat_jpeg: bytes
) -> None:
    port = proxied_service.port  # SERVING: the registry was read
    with connect(port) as channel:
        api = refit_pb2_grpc.RefitStub(channel)
        s3_proxy.cut()
        try:
            # Health polled through the outage: it must never leave SERVING, from the moment the
            # store is cut to two reconcile passes after the service noticed.
            def noticed() -> bool:
                assert health(port) == SERVING, "NOT_SERVING while the store is down"
                return store_up() == 0

            wait_until(noticed, 30, "the outage noticed")
            end = time.monotonic() + 2 * INTERVAL_S + 1
            while time.monotonic() < end:
                assert health(port) == SERVING, "NOT_SERVING while the store is down"
                time.sleep(0.2)
            answer = api.Predict(pb.PredictRequest(image=cat_jpeg, model="imagenet"), timeout=30)
            assert answer.version == "1" and 281 <= answer.predictions[0].index <= 285
            model = api.GetModel(pb.GetModelRequest(name="imagenet"), timeout=10)
            assert model.default_served
            assert "object store" in model.problem and "last read" in model.problem, model.problem
            # The outage is the store's alert, not every model's.
            assert REGISTRY.get_sample_value("refit_model_problem", {"model": "imagenet"}) is None
            with pytest.raises(grpc.RpcError) as unknown:
                api.GetModel(pb.GetModelRequest(name="nosuchmodel"), timeout=10)
            assert unknown.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "the model registry could not be read" in unknown.value.details()
        finally:
            s3_proxy.restore()
        wait_until(lambda: store_up() == 1, 30, "the store seen up again")
        assert health(port) == SERVING
        model = api.GetModel(pb.GetModelRequest(name="imagenet"), timeout=10)
        assert model.problem == "" and model.default_served
        with pytest.raises(grpc.RpcError) as unknown:
            api.GetModel(pb.GetModelRequest(name="nosuchmodel"), timeout=10)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_the_store_down_at_start_up_is_not_ready_until_it_answers(
    moto_server: MotoServer,
    refit_bucket: str,
    torchserve: TorchServeProcess,
    s3_proxy: S3FaultProxy,
    cat_jpeg: bytes,
) -> None:
    s3_proxy.cut()
    refit = None
    try:
        settings = proxied_settings(moto_server, refit_bucket, torchserve, s3_proxy)
        refit = start_service(settings, wait_ready=False)
        wait_until(lambda: store_up() == 0, 30, "the outage noticed")
        end = time.monotonic() + 2 * INTERVAL_S + 1
        while time.monotonic() < end:  # TorchServe answers, but no default is known: not ready
            assert health(refit.port) != SERVING, "SERVING with nothing cached"
            time.sleep(0.2)
        with connect(refit.port) as channel:
            api = refit_pb2_grpc.RefitStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                api.GetModel(pb.GetModelRequest(name="imagenet"), timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "the model registry could not be read" in caught.value.details()
            s3_proxy.restore()
            wait_serving(refit.port, timeout_s=60)
            answer = api.Predict(pb.PredictRequest(image=cat_jpeg, model="imagenet"), timeout=30)
            assert answer.version == "1"
    finally:
        s3_proxy.restore()
        if refit is not None:
            refit.stop()


class ManagementProxy:
    """Forwards TorchServe's gRPC management API, byte for byte, to the real one; while
    ``refusing`` it answers SetDefault as TorchServe does for a version it does not hold."""

    def __init__(self, upstream: str) -> None:
        self.refusing = True
        self.forwarded: dict[str, int] = {}
        self.refused = 0
        self._lock = threading.Lock()
        self._upstream = grpc.insecure_channel(upstream)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self._server.add_generic_rpc_handlers([_Generic(self)])
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop(0)
        self._upstream.close()

    def handle(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        call = method.rsplit("/", 1)[-1]
        if call == "SetDefault" and self.refusing:
            with self._lock:
                self.refused += 1
            context.abort(grpc.StatusCode.NOT_FOUND, "Model version not found: refused by proxy")
        try:
            metadata = [m for m in context.invocation_metadata() if m.key == "authorization"]
            answer = self._upstream.unary_unary(method)(
                request, timeout=context.time_remaining(), metadata=metadata
            )
        except grpc.RpcError as exc:
            context.abort(exc.code(), exc.details() or "")
        with self._lock:
            self.forwarded[call] = self.forwarded.get(call, 0) + 1
        return answer


class _Generic(grpc.GenericRpcHandler):
    def __init__(self, proxy: ManagementProxy) -> None:
        self.proxy = proxy

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = details.method
        return grpc.unary_unary_rpc_method_handler(
            lambda request, context: self.proxy.handle(method, request, context)
        )


@pytest.fixture
def management_proxy(torchserve: TorchServeProcess) -> Iterator[ManagementProxy]:
    proxy = ManagementProxy(f"127.0.0.1:{torchserve.ports.grpc_management}")
    proxy.start()
    yield proxy
    proxy.stop()


def test_a_refused_set_default_keeps_the_replica_in_rotation(
    moto_server: MotoServer,
    refit_bucket: str,
    torchserve: TorchServeProcess,
    management_proxy: ManagementProxy,
    cat_jpeg: bytes,
) -> None:
    # A long reconcile interval: the retries below are the backoff's doing.
    settings = service_settings(
        moto_server,
        refit_bucket,
        torchserve,
        torchserve_management=f"127.0.0.1:{management_proxy.port}",
        reconcile_interval_s=300.0,
        reconcile_retry_s=0.5,
    )
    refit = start_service(settings, wait_ready=False)
    try:
        wait_serving(refit.port, timeout_s=90)
        replica = {"replica": f"127.0.0.1:{management_proxy.port}"}
        assert REGISTRY.get_sample_value("refit_torchserve_replica_in_rotation", replica) == 1
        with connect(refit.port) as channel:
            api = refit_pb2_grpc.RefitStub(channel)
            answer = api.Predict(pb.PredictRequest(image=cat_jpeg, model="imagenet"), timeout=30)
            assert answer.version == "1"
            assert not api.GetModel(pb.GetModelRequest(name="imagenet"), timeout=10).problem

        def failures() -> float:
            labels = {"model": "imagenet"}
            return REGISTRY.get_sample_value("refit_set_default_failures_total", labels) or 0

        wait_until(lambda: failures() >= 2, 30, "SetDefault retried")
        assert management_proxy.refused >= 2
        management_proxy.refusing = False
        wait_until(lambda: management_proxy.forwarded.get("SetDefault", 0) >= 1, 30, "retry")
        assert health(refit.port) == SERVING
    finally:
        refit.stop()
