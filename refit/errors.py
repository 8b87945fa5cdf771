"""Domain errors shared by every component, and the one place that maps errors to gRPC statuses.

Each error carries the status code it means and a message a user can act on. Anything unexpected
becomes INTERNAL with a logged traceback: never UNKNOWN, never a crashed server. ``to_status`` is
the mapping: the trainer's synchronous server installs ``ErrorInterceptor``, the service's
asyncio front door (service/frontdoor.py) calls it directly."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc


class RefitError(Exception):
    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(RefitError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class PayloadTooLarge(RefitError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class ResourceExhausted(RefitError):
    """Out of a shared resource right now (a queue, a budget): retry later, with backoff."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class NotFound(RefitError):
    code = grpc.StatusCode.NOT_FOUND


class Unavailable(RefitError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(RefitError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class AlreadyExists(RefitError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(RefitError):
    code = grpc.StatusCode.FAILED_PRECONDITION


log = logging.getLogger(__name__)


def to_status(exc: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, RefitError):
        return exc.code, exc.message
    log.exception("unexpected error", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"


class ErrorInterceptor(grpc.ServerInterceptor):
    """Turns exceptions escaping a servicer into ``context.abort(code, message)``."""

    def intercept_service(self, continuation: Callable, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        return wrap_handler(handler, _guard_unary, _guard_stream)


def _guard_unary(behavior: Callable) -> Callable:
    def guarded(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return behavior(request, context)
        except Exception as exc:
            _abort(context, exc)

    return guarded


def _guard_stream(behavior: Callable) -> Callable:
    def guarded(request: Any, context: grpc.ServicerContext) -> Iterator:
        try:
            yield from behavior(request, context)
        except Exception as exc:
            _abort(context, exc)

    return guarded


def _abort(context: grpc.ServicerContext, exc: Exception) -> None:
    if context.code() not in (None, grpc.StatusCode.OK):
        raise exc  # already aborted by the servicer itself: keep its status
    code, message = to_status(exc)
    context.abort(code, message)


def wrap_handler(
    handler: grpc.RpcMethodHandler | None,
    wrap_unary_response: Callable[[Callable], Callable],
    wrap_stream_response: Callable[[Callable], Callable],
) -> grpc.RpcMethodHandler | None:
    """Wraps whichever behaviour a handler has; unary and streaming responses differ in shape."""
    if handler is None:
        return None
    if handler.unary_unary:
        return handler._replace(unary_unary=wrap_unary_response(handler.unary_unary))
    if handler.stream_unary:
        return handler._replace(stream_unary=wrap_unary_response(handler.stream_unary))
    if handler.unary_stream:
        return handler._replace(unary_stream=wrap_stream_response(handler.unary_stream))
    return handler._replace(stream_stream=wrap_stream_response(handler.stream_stream))
