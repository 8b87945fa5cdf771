"""Bounds on what long calls may hold, for the trainer's synchronous gRPC server (the service's
asyncio front door counts its own: service/frontdoor.py).

Each gRPC call holds one server thread for as long as it lasts, and streaming calls (the
service's PredictStream and WatchJob, the trainer's Subscribe) can last for hours. A server takes
at most its thread count of calls at once (gRPC answers the next one RESOURCE_EXHAUSTED at once
rather than queueing it without a thread), and ``StreamLimitInterceptor`` keeps streaming calls
to ``max_streams`` of them, so unary calls and health checks always find a thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from refit.errors import wrap_handler


class StreamLimitInterceptor(grpc.ServerInterceptor):
    """``setting``: the variable that sets ``max_streams``, named in the refusal."""

    def __init__(self, max_streams: int, setting: str) -> None:
        self.max_streams = max_streams
        self.setting = setting
        self._slots = threading.BoundedSemaphore(max_streams)
        self._lock = threading.Lock()
        self._active = 0

    @property
    def active(self) -> int:
        """Streaming calls in progress now."""
        with self._lock:
            return self._active

    def intercept_service(self, continuation: Callable, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or not handler.response_streaming:
            return handler
        return wrap_handler(handler, lambda behavior: behavior, self._limited)

    def _limited(self, behavior: Callable) -> Callable:
        def limited(request: Any, context: grpc.ServicerContext) -> Iterator:
            if not self._slots.acquire(blocking=False):
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"too many streaming calls in progress ({self.setting}="
                    f"{self.max_streams}); retry later",
                )
            self._count(+1)
            try:
                yield from behavior(request, context)
            finally:
                self._count(-1)
                self._slots.release()

        return limited

    def _count(self, change: int) -> None:
        with self._lock:
            self._active += change
