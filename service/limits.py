"""Bounds on what long calls may hold.

Each gRPC call holds one server thread for as long as it lasts, and PredictStream and WatchJob
can last for hours. The server takes at most ``workers`` calls at once (gRPC answers the next
one RESOURCE_EXHAUSTED at once rather than queueing it without a thread), and this interceptor
keeps streaming calls to ``max_streams`` of them, so unary calls and health checks always find
a thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from refit.errors import wrap_handler


class StreamLimitInterceptor(grpc.ServerInterceptor):
    def __init__(self, max_streams: int) -> None:
        self.max_streams = max_streams
        self._slots = threading.BoundedSemaphore(max_streams)

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
                    f"too many streaming calls in progress (REFIT_MAX_STREAMS="
                    f"{self.max_streams}); retry later",
                )
            try:
                yield from behavior(request, context)
            finally:
                self._slots.release()

        return limited
