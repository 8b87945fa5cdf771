"""grpc.aio servers, each on an event loop and thread of its own, run from synchronous code.

The service runs two: the API (service/server.py) and one serving only grpc.health.v1 for
probes, so that no load on the API's loop, authenticated or not, can delay a probe's answer.
Both get the same connection bounds (``connection_options``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from refit.netutil import bind
from service.config import ServiceSettings

KEEPALIVE_TIMEOUT_S = 20.0  # a peer that does not answer the server's ping in this long is gone
MAX_PING_STRIKES = 2  # pings sooner than REFIT_MIN_CLIENT_PING_S before the connection is closed


def connection_options(settings: ServiceSettings) -> list[tuple[str, int]]:
    """Bounds on connections, and on what each may hold: its streams, its idle time, its pings."""
    return [
        ("grpc.max_allowed_incoming_connections", settings.max_connections),
        ("grpc.max_concurrent_streams", settings.max_streams_per_connection),
        ("grpc.max_connection_idle_ms", int(1000 * settings.connection_idle_s)),
        ("grpc.keepalive_time_ms", int(1000 * settings.keepalive_s)),
        ("grpc.keepalive_timeout_ms", int(1000 * KEEPALIVE_TIMEOUT_S)),
        ("grpc.http2.min_ping_interval_without_data_ms", int(1000 * settings.min_client_ping_s)),
        ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
    ]


class LoopServer:
    """One grpc.aio server with its health servicer, on its own event loop thread."""

    def __init__(
        self,
        name: str,
        address: str,
        options: Sequence[tuple[str, int]],
        *,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        add_services: Callable[[grpc.aio.Server], None] = lambda server: None,
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()
        self.health = health.aio.HealthServicer()
        self._status: dict[str, int] = {}

        async def build() -> tuple[grpc.aio.Server, int]:  # grpc.aio binds the running loop
            server = grpc.aio.server(interceptors=interceptors, options=list(options))
            health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
            add_services(server)
            return server, bind(server, address, credentials)

        try:
            self.server, self.port = self._run(build())
        except BaseException:
            self._close_loop()
            raise

    def start(self) -> None:
        self._run(self.server.start())

    def stop(self, grace_s: float) -> None:
        self._run(self.server.stop(grace_s))
        self._close_loop()

    def set_health(self, services: Sequence[str], status: int) -> None:
        """Sets each service's status (unchanged ones are not set again; none once stopped)."""
        for service in services:
            if self.loop.is_closed():
                return
            if self._status.get(service) != status:
                self._run(self.health.set(service, status), timeout_s=5.0)
                self._status[service] = status

    def _run(self, coroutine: Coroutine, timeout_s: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def _close_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
