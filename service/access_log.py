"""Binds a request id to every RPC (for the logs) and logs calls that did not end OK."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from refit import logs
from refit.errors import wrap_handler

log = logging.getLogger("refit.access")
REQUEST_ID_HEADER = "x-request-id"


class AccessLogInterceptor(grpc.ServerInterceptor):
    def intercept_service(self, continuation: Callable, handler_call_details: Any) -> Any:
        method = handler_call_details.method
        metadata = dict(handler_call_details.invocation_metadata or ())
        header_id = metadata.get(REQUEST_ID_HEADER, "")
        handler = continuation(handler_call_details)

        def unary(behavior: Callable) -> Callable:
            def logged(request: Any, context: grpc.ServicerContext) -> Any:
                rid = _request_id(header_id, request)
                with logs.bound(logs.request_id, rid):
                    start = time.perf_counter()
                    try:
                        return behavior(request, context)
                    finally:
                        _log(method, context, start)

            return logged

        def stream(behavior: Callable) -> Callable:
            def logged(request: Any, context: grpc.ServicerContext) -> Iterator:
                rid = _request_id(header_id, request)
                start = time.perf_counter()
                try:
                    with logs.bound(logs.request_id, rid):
                        yield from behavior(request, context)
                finally:
                    with logs.bound(logs.request_id, rid):
                        _log(method, context, start)

            return logged

        return wrap_handler(handler, unary, stream)


def _request_id(header_id: str, request: Any) -> str:
    return header_id or getattr(request, "request_id", "") or uuid.uuid4().hex[:16]


def _log(method: str, context: grpc.ServicerContext, start: float) -> None:
    code = context.code() or grpc.StatusCode.OK
    millis = 1000 * (time.perf_counter() - start)
    level = logging.DEBUG if code == grpc.StatusCode.OK else logging.WARNING
    log.log(level, "%s %s %.1fms", method, code.name, millis)
