"""bench/predict_latency.py's load generator against a real gRPC server that takes fewer calls at
once than the load keeps in flight: refused calls are counted when asked, else they end the run.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def predict_latency() -> Iterator[ModuleType]:
    sys.path.insert(0, str(BENCH))  # the script imports its neighbours
    spec = importlib.util.spec_from_file_location("predict_latency", BENCH / "predict_latency.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]
    sys.path.remove(str(BENCH))


class SlowHealth(health_pb2_grpc.HealthServicer):
    def Check(self, request, context):
        time.sleep(0.05)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


@pytest.fixture
def one_call_at_a_time() -> Iterator[str]:
    server = grpc.server(ThreadPoolExecutor(max_workers=4), maximum_concurrent_rpcs=1)
    health_pb2_grpc.add_HealthServicer_to_server(SlowHealth(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def checks(address: str) -> Callable[[], Callable[[bytes], None]]:
    def make() -> Callable[[bytes], None]:
        stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
        return lambda _: stub.Check(health_pb2.HealthCheckRequest(), timeout=10)

    return make


def test_refused_calls_are_counted_not_timed(predict_latency, one_call_at_a_time) -> None:
    refused: list[int] = []
    latencies, seconds = predict_latency.load(checks(one_call_at_a_time), [b""], 16, 4, refused)
    assert refused, "4 callers against a server taking 1 call at a time: some are refused"
    assert len(latencies) + len(refused) == 16
    assert seconds > 0


def test_without_a_count_a_refused_call_ends_the_run(predict_latency, one_call_at_a_time) -> None:
    with pytest.raises(RuntimeError, match="calls failed"):
        predict_latency.load(checks(one_call_at_a_time), [b""], 16, 4)
