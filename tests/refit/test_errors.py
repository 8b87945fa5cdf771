"""The one error-to-status mapping: every branch, with a fake context (pure logic)."""

from __future__ import annotations

import grpc
import pytest

from refit import errors
from refit.errors import ErrorInterceptor, to_status
from refit.identifiers import InvalidModelName
from refit.registry import ModelNotFound
from refit.storage import InvalidKey, NoSuchBucket, NoSuchObject, StoreFull, StoreUnreachable


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (errors.InvalidArgument("m"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.PayloadTooLarge("m"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.ResourceExhausted("m"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.NotFound("m"), grpc.StatusCode.NOT_FOUND),
        (errors.Unavailable("m"), grpc.StatusCode.UNAVAILABLE),
        (errors.DeadlineExceeded("m"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.AlreadyExists("m"), grpc.StatusCode.ALREADY_EXISTS),
        (errors.FailedPrecondition("m"), grpc.StatusCode.FAILED_PRECONDITION),
        (ModelNotFound("m"), grpc.StatusCode.NOT_FOUND),
        (InvalidModelName("m"), grpc.StatusCode.INVALID_ARGUMENT),
        (NoSuchBucket("m"), grpc.StatusCode.NOT_FOUND),
        (NoSuchObject("m"), grpc.StatusCode.NOT_FOUND),
        (InvalidKey("m"), grpc.StatusCode.INVALID_ARGUMENT),
        (StoreFull("m"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (StoreUnreachable("m"), grpc.StatusCode.UNAVAILABLE),
    ],
)
def test_known_errors_keep_their_message(exc: Exception, code: grpc.StatusCode) -> None:
    assert to_status(exc) == (code, "m")


def test_unexpected_errors_become_internal_not_unknown() -> None:
    code, message = to_status(ZeroDivisionError("secret detail"))
    assert code == grpc.StatusCode.INTERNAL
    assert "ZeroDivisionError" in message and "secret detail" not in message


class Aborted(Exception):
    pass


class FakeContext:
    def __init__(self, code: grpc.StatusCode | None = None) -> None:
        self._code = code
        self.aborted: tuple | None = None

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def abort(self, code: grpc.StatusCode, message: str) -> None:
        self.aborted = (code, message)
        raise Aborted


def intercept(behavior: object, streaming: bool = False) -> object:
    handler = (
        grpc.unary_stream_rpc_method_handler(behavior)
        if streaming
        else grpc.unary_unary_rpc_method_handler(behavior)
    )
    wrapped = ErrorInterceptor().intercept_service(lambda _: handler, None)
    return wrapped.unary_stream if streaming else wrapped.unary_unary


def test_interceptor_aborts_with_the_mapped_status() -> None:
    def fail(request: object, context: object) -> None:
        raise errors.NotFound("no such model")

    context = FakeContext()
    with pytest.raises(Aborted):
        intercept(fail)(None, context)
    assert context.aborted == (grpc.StatusCode.NOT_FOUND, "no such model")


def test_interceptor_maps_errors_raised_mid_stream() -> None:
    def stream(request: object, context: object):
        yield 1
        raise errors.Unavailable("gone")

    context = FakeContext()
    results = intercept(stream, streaming=True)(None, context)
    assert next(results) == 1
    with pytest.raises(Aborted):
        next(results)
    assert context.aborted == (grpc.StatusCode.UNAVAILABLE, "gone")


def test_interceptor_keeps_a_status_the_servicer_already_set() -> None:
    def already(request: object, context: object) -> None:
        raise RuntimeError("abort() raised this after setting the code")

    context = FakeContext(grpc.StatusCode.PERMISSION_DENIED)
    with pytest.raises(RuntimeError):
        intercept(already)(None, context)
    assert context.aborted is None


def test_interceptor_passes_unknown_methods_through() -> None:
    assert ErrorInterceptor().intercept_service(lambda _: None, None) is None
