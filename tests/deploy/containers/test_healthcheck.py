"""deploy/containers/healthcheck.py, the images' HEALTHCHECK, against real servers on free
loopback ports: SERVING and 2xx pass; NOT_SERVING, errors and nothing listening fail."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from deploy.containers import healthcheck
from refit.netutil import free_port


@pytest.fixture
def grpc_health() -> Iterator[tuple[str, object]]:
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(0)


@pytest.fixture
def http_server() -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/ping" else 500)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_grpc_serving_passes_and_not_serving_fails(grpc_health):
    address, servicer = grpc_health
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert healthcheck.main(["grpc", address]) == 0
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert healthcheck.main(["grpc", address]) == 1


def test_grpc_address_from_the_environment_probes_loopback(grpc_health, monkeypatch):
    address, servicer = grpc_health
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    monkeypatch.setenv("TEST_BIND", "0.0.0.0:" + address.rpartition(":")[2])
    assert healthcheck.probe_address("env:TEST_BIND") == address
    assert healthcheck.main(["grpc", "env:TEST_BIND"]) == 0


def test_nothing_listening_fails():
    port = free_port()
    assert healthcheck.main(["grpc", f"127.0.0.1:{port}"]) == 1
    assert healthcheck.main(["http", f"http://127.0.0.1:{port}/ping"]) == 1


def test_http_2xx_passes_and_errors_fail(http_server):
    assert healthcheck.main(["http", f"{http_server}/ping"]) == 0
    assert healthcheck.main(["http", f"{http_server}/broken"]) == 1


def test_usage_errors_exit_2():
    assert healthcheck.main([]) == 2
    assert healthcheck.main(["tcp", "127.0.0.1:1"]) == 2
