"""Several TorchServe replicas behind one service (issue 12): Predicts are spread over them by
gRPC round robin; a replica killed under load costs no Predict (gRPC retries the in-flight ones
that failed with UNAVAILABLE on another replica) and leaves the rotation; restarted, it is
registered again by the reconciler, with no manual step, and takes traffic again.

Replica A is the session's TorchServe, replica B this module's own (only B is ever killed). Each
replica's share of Predicts is read from its own metrics (``ts_inference_requests_total``)."""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import NoReturn

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from local_stack.torchserve import TorchServePorts, TorchServeProcess
from refit.errors import RefitError
from refit.torchserve import FileKeys, TorchServeClient
from refit.torchserve_api import inference_pb2_grpc
from refit.v1 import refit_pb2 as pb
from refit.v1 import refit_pb2_grpc
from service.server import RefitServer
from tests.conftest import MotoServer, free_port, wait_until
from tests.faults import S3FaultProxy
from tests.service.conftest import (
    connect,
    service_settings,
    start_service,
    torchserve_process,
)

pytestmark = pytest.mark.integration
RECOVERY_BOUND_S = 120.0  # B back in rotation after its restart (start + registering a worker)


def predictions_served(process: TorchServeProcess, model: str = "imagenet") -> int:
    """Predictions this TorchServe answered, from its own Prometheus metrics."""
    url = f"http://127.0.0.1:{process.ports.metrics}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    pattern = rf'^ts_inference_requests_total\{{[^}}]*model_name="{model}"[^}}]*\}} (\S+)$'
    return int(sum(float(value) for value in re.findall(pattern, text, re.MULTILINE)))


def grpc_addresses(*processes: TorchServeProcess) -> dict[str, str]:
    replicas = [process.ports for process in processes]
    return {
        "torchserve_inference": ",".join(f"127.0.0.1:{p.grpc_inference}" for p in replicas),
        "torchserve_management": ",".join(f"127.0.0.1:{p.grpc_management}" for p in replicas),
        "torchserve_management_rest": ",".join(f"127.0.0.1:{p.management}" for p in replicas),
        "torchserve_metrics": ",".join(f"127.0.0.1:{p.metrics}" for p in replicas),
        "torchserve_keys": "file:" + ",".join(str(process.key_file) for process in processes),
    }


def replica_gauge(name: str, ports: TorchServePorts) -> float | None:
    return REGISTRY.get_sample_value(name, {"replica": f"127.0.0.1:{ports.grpc_management}"})


@pytest.fixture(scope="module")
def replica_b(
    tmp_path_factory: pytest.TempPathFactory, moto_server: MotoServer, s3_proxy: S3FaultProxy
) -> Iterator[TorchServeProcess]:
    with torchserve_process(tmp_path_factory, "torchserve-b", moto_server, s3_proxy) as process:
        yield process


@pytest.fixture(scope="module")
def service(
    moto_server: MotoServer,
    refit_bucket: str,
    torchserve: TorchServeProcess,
    replica_b: TorchServeProcess,
) -> Iterator[RefitServer]:
    # The reconcile interval is long on purpose: what happens below is the watch's doing.
    addresses = grpc_addresses(torchserve, replica_b)
    settings = service_settings(
        moto_server, refit_bucket, torchserve, reconcile_interval_s=300.0, **addresses
    )
    refit = start_service(settings)
    yield refit
    refit.stop()


@pytest.fixture(scope="module")
def api(service: RefitServer) -> Iterator[refit_pb2_grpc.RefitStub]:
    with connect(service.port) as channel:
        yield refit_pb2_grpc.RefitStub(channel)


def in_rotation(*processes: TorchServeProcess) -> bool:
    return all(
        replica_gauge("refit_torchserve_replica_in_rotation", p.ports) == 1 for p in processes
    )


def test_predicts_are_spread_over_both_replicas(
    service: RefitServer, api, torchserve, replica_b, cat_jpeg
) -> None:
    wait_until(lambda: in_rotation(torchserve, replica_b), 60, "both replicas in rotation")
    before = predictions_served(torchserve), predictions_served(replica_b)
    for _ in range(20):
        answer = api.Predict(pb.PredictRequest(image=cat_jpeg, model="imagenet"), timeout=30)
        assert 281 <= answer.predictions[0].index <= 285
    a, b = (predictions_served(torchserve) - before[0], predictions_served(replica_b) - before[1])
    assert a + b == 20 and a >= 6 and b >= 6, (a, b)
    model = api.GetModel(pb.GetModelRequest(name="imagenet"), timeout=10)
    (v1,) = model.versions
    assert model.default_served and v1.registration == pb.ModelVersion.REGISTERED
    assert {r.replica for r in v1.replicas} == {
        f"127.0.0.1:{p.ports.grpc_management}" for p in (torchserve, replica_b)
    }
    assert all(r.registration == pb.ModelVersion.REGISTERED for r in v1.replicas)


class SteadyLoad:
    """``clients`` threads sending Predicts back to back; every failure kept with its time."""

    def __init__(self, stub: refit_pb2_grpc.RefitStub, image: bytes, clients: int = 4) -> None:
        self.stub, self.image = stub, image
        self.stop = threading.Event()
        self.ok = 0
        self.failures: list[tuple[float, str]] = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        request = pb.PredictRequest(image=self.image, model="imagenet")
        while not self.stop.is_set():
            try:
                self.stub.Predict(request, timeout=30)
                self.ok += 1
            except grpc.RpcError as exc:
                self.failures.append((time.monotonic(), f"{exc.code().name}: {exc.details()}"))

    def __enter__(self) -> SteadyLoad:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


def test_a_replica_killed_under_load_costs_no_predict_and_comes_back(
    service: RefitServer, api, torchserve, replica_b, cat_jpeg
) -> None:
    wait_until(lambda: in_rotation(torchserve, replica_b), 60, "both replicas in rotation")
    health = health_pb2_grpc.HealthStub(connect(service.port))
    with SteadyLoad(api, cat_jpeg) as load:
        wait_until(lambda: load.ok >= 8, 60, "8 Predicts before the kill")
        replica_b.kill()
        left = wait_until(lambda: not in_rotation(replica_b), 10, "B leaving the rotation")
        down = load.ok
        wait_until(lambda: load.ok >= down + 8, 60, "8 Predicts with B out of the rotation")
        served_while_down = load.ok
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == (
            health_pb2.HealthCheckResponse.SERVING
        )
        model = api.GetModel(pb.GetModelRequest(name="imagenet"), timeout=10)
        assert model.default_served
        assert model.versions[0].registration == pb.ModelVersion.PENDING
        assert f"replica 127.0.0.1:{replica_b.ports.grpc_management}" in (
            model.versions[0].registration_error
        )
        # Awaited: the session's other service, in this process, re-labels the same gauge.
        wait_until(
            lambda: replica_gauge("refit_torchserve_replica_up", replica_b.ports) == 0,
            10,
            "B reported down",
        )

        restarted = time.monotonic()
        replica_b.start()
        back = wait_until(lambda: in_rotation(replica_b), RECOVERY_BOUND_S, "B back in rotation")
        print(f"B left the rotation {left:.1f}s after SIGKILL; back {back:.1f}s after restart")
        assert time.monotonic() - restarted < RECOVERY_BOUND_S
        b_before = predictions_served(replica_b)
        wait_until(lambda: predictions_served(replica_b) > b_before, 30, "B taking traffic again")
    assert load.ok > served_while_down > 0
    # The kill may hit at most one call per client in flight; gRPC retries those on A.
    assert len(load.failures) <= 4, load.failures
    print(f"{load.ok} Predicts answered, {len(load.failures)} failed: {load.failures}")


class RefusingTorchServe(inference_pb2_grpc.InferenceAPIsServiceServicer):
    """A replica that answers every Predict with one status code, counting the calls."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details, self.calls = code, details, 0

    def Predictions(self, request: object, context: grpc.ServicerContext) -> NoReturn:
        self.calls += 1
        context.abort(self.code, self.details)


@pytest.fixture
def refusing() -> Iterator[Callable]:
    servers = []

    def start(code: grpc.StatusCode, details: str) -> tuple[RefusingTorchServe, int]:
        servicer = RefusingTorchServe(code, details)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return servicer, port

    yield start
    for server in servers:
        server.stop(0)


def balanced_client(refusing_port: int, real: TorchServeProcess) -> TorchServeClient:
    """A client over a refusing replica (first in turn) and a real one; the refusing one
    checks no key, the real one gets its own."""
    management = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{real.ports.grpc_management}"]
    return TorchServeClient(
        f"127.0.0.1:{refusing_port},127.0.0.1:{real.ports.grpc_inference}",
        ",".join(management),
        keys=FileKeys(dict.fromkeys(management, real.key_file)),
    )


def test_unavailable_is_retried_once_on_another_replica(
    torchserve: TorchServeProcess, refusing, cat_jpeg, service
) -> None:
    fake, port = refusing(grpc.StatusCode.UNAVAILABLE, "replica going away")
    client = balanced_client(port, torchserve)
    before = predictions_served(torchserve)
    try:
        for _ in range(10):
            answer = client.predict("imagenet", "1", cat_jpeg, top_k=1)
            assert 281 <= answer["predictions"][0]["index"] <= 285
    finally:
        client.close()
    # Round robin alternates first picks: every other Predict went to the refusing replica first
    # and was retried on the other one, which answered every Predict.
    assert fake.calls == 5
    assert predictions_served(torchserve) - before == 10


def test_other_errors_are_not_retried(
    torchserve: TorchServeProcess, refusing, cat_jpeg, service
) -> None:
    fake, port = refusing(grpc.StatusCode.INTERNAL, "handler crashed")
    client = balanced_client(port, torchserve)
    outcomes: Counter[str] = Counter()
    try:
        for _ in range(10):
            try:
                client.predict("imagenet", "1", cat_jpeg, top_k=1)
                outcomes["ok"] += 1
            except RefitError as exc:
                assert "handler crashed" in exc.message
                outcomes["failed"] += 1
    finally:
        client.close()
    assert outcomes["failed"] == fake.calls >= 3 and outcomes["ok"] == 10 - fake.calls
