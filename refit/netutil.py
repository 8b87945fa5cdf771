"""Small network helpers shared by the launcher, the benchmarks and the tests."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_serving(
    address: str, timeout_s: float = 120.0, alive: Callable[[], bool] = lambda: True
) -> None:
    """Waits until the gRPC health service at ``address`` says SERVING."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if not alive():
                raise RuntimeError(f"the server for {address} exited before it was SERVING")
            try:
                answer = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"{address} was not SERVING after {timeout_s:.0f}s")


def wait_for_signal() -> None:
    """Blocks until SIGTERM or SIGINT: the servers' mains then stop gracefully."""
    stopped = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()


def bind(
    server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None = None
) -> int:
    """Binds ``address`` (port 0: any free port), with TLS when given ``credentials``; returns
    the port."""
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise RuntimeError(f"cannot bind gRPC address {address}")
    return port
