"""The front door of grpc's asyncio server: one interceptor that authenticates, bounds, logs,
counts and maps errors for every RefitServicer call, in that order.

- Authentication runs on the call's headers, before its message is read: a refused call gets its
  status at once (a handler that never reads) and costs no thread, whatever it sends next.
- An authenticated call must deliver its request message within ``read_timeout_s``; waiting for
  it holds a coroutine on the event loop, never a thread.
- Then the call takes one of ``max_calls`` slots (the servicer's threads) and, if it streams, one
  of ``max_streams``; past either it is refused with RESOURCE_EXHAUSTED at once, never queued.
  Slots are counted on the event loop's thread only, so they need no lock; a slot is free once
  the servicer's thread is (before the answer is sent), however the call ended.
- The servicer is synchronous and runs on ``pool``; ``CallContext`` is what it may use of its
  call from there. Exceptions become statuses through ``refit.errors.to_status``.
Health and reflection are asyncio servicers: they pass through untouched, on the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import grpc

from refit import logs
from refit.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, to_status
from service.access_log import REQUEST_ID_HEADER, log_call, request_id
from service.auth import OPEN_SERVICES, Authenticator
from service.metrics import AUTH_FAILURES, RPC_AWAITING_MESSAGE, RPC_IN_FLIGHT, record_call

_END = object()


class CallContext:
    """The part of an asyncio call that the synchronous servicer uses, from a pool thread."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context

    def time_remaining(self) -> float | None:
        return self._context.time_remaining()

    def add_callback(self, callback: Callable[[], None]) -> bool:
        """Runs ``callback`` when the call ends, however it ends; False: it has ended."""
        if self._context.done():
            return False
        self._context.add_done_callback(lambda _: callback())
        return True


class FrontDoor(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        authenticator: Authenticator | None,
        pool: ThreadPoolExecutor,
        *,
        max_calls: int,
        max_streams: int,
        read_timeout_s: float,
    ) -> None:
        self.authenticator = authenticator
        self.pool = pool
        self.max_calls = max_calls
        self.max_streams = max_streams
        self.read_timeout_s = read_timeout_s
        self.calls = 0  # slots taken now; read and written on the event loop only
        self.streams = 0

    async def intercept_service(self, continuation: Callable, details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_SERVICES):
            return handler
        rpc = details.method.rsplit("/", 1)[-1]
        metadata = dict(details.invocation_metadata or ())
        if self.authenticator is not None:
            denial = self.authenticator.denial(rpc, metadata.get("authorization", ""))
            if denial is not None:
                return _denied(rpc, *denial)
        header_id = metadata.get(REQUEST_ID_HEADER, "")
        if handler.request_streaming:
            return grpc.stream_stream_rpc_method_handler(
                self._streamed_requests(rpc, header_id, handler.stream_stream),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                self._one_request_streamed(rpc, header_id, handler.unary_stream),
                handler.request_deserializer,
                handler.response_serializer,
            )
        # Read here, not by grpc, so that the read is bounded: a request-streaming handler.
        return grpc.stream_unary_rpc_method_handler(
            self._unary(rpc, header_id, handler.unary_unary),
            handler.request_deserializer,
            handler.response_serializer,
        )

    # --- the three shapes of RefitServicer's methods ---------------------------------------------

    def _unary(self, rpc: str, header_id: str, behavior: Callable) -> Callable:
        async def unary(requests: AsyncIterator, context: grpc.aio.ServicerContext) -> Any:
            start, rid, code = time.perf_counter(), header_id, grpc.StatusCode.OK
            try:
                request = await self._read(requests)
                rid = request_id(header_id, request)
                slot = self._slot(rpc, streaming=False)
                answer = self.pool.submit(_bound, rid, behavior, request, CallContext(context))
                slot.free_after(answer)
                return await asyncio.wrap_future(answer)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:
                code, message = to_status(exc)
                await context.abort(code, message)
            finally:
                _done(rpc, rid, code, start)

        return unary

    def _one_request_streamed(self, rpc: str, header_id: str, behavior: Callable) -> Callable:
        async def stream(requests: AsyncIterator, context: grpc.aio.ServicerContext) -> Any:
            request = await self._read(requests)
            rid = request_id(header_id, request)
            async for answer in self._stream(rpc, rid, behavior, request, context):
                yield answer

        return self._guarded_stream(rpc, header_id, stream)

    def _streamed_requests(self, rpc: str, header_id: str, behavior: Callable) -> Callable:
        async def stream(requests: AsyncIterator, context: grpc.aio.ServicerContext) -> Any:
            loop = asyncio.get_running_loop()
            async for answer in self._stream(
                rpc, header_id or request_id("", None), behavior,
                _SyncRequests(requests, loop), context,
            ):  # fmt: skip
                yield answer

        return self._guarded_stream(rpc, header_id, stream)

    def _guarded_stream(self, rpc: str, header_id: str, stream: Callable) -> Callable:
        async def guarded(requests: AsyncIterator, context: grpc.aio.ServicerContext) -> Any:
            start, code = time.perf_counter(), grpc.StatusCode.OK
            try:
                async for answer in stream(requests, context):
                    yield answer
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:
                code, message = to_status(exc)
                await context.abort(code, message)
            finally:
                _done(rpc, header_id, code, start)

        return guarded

    async def _stream(
        self,
        rpc: str,
        rid: str,
        behavior: Callable,
        request: Any,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator:
        """The servicer's generator, one answer at a time on the pool: a thread is held only
        while the next answer is being made; the slot, for the whole stream."""
        slot = self._slot(rpc, streaming=True)
        pending: Future = self.pool.submit(_bound, rid, behavior, request, CallContext(context))
        answers = None
        try:
            answers = await asyncio.wrap_future(pending)
            while True:
                pending = self.pool.submit(_bound, rid, next, answers, _END)
                answer = await asyncio.wrap_future(pending)
                if answer is _END:
                    return
                yield answer
        finally:
            if answers is not None:  # closed once no thread runs it (the call's end wakes it)
                pending.add_done_callback(lambda _: answers.close())
            slot.free_after(pending)

    # --- bounds ----------------------------------------------------------------------------------

    async def _read(self, requests: AsyncIterator) -> Any:
        RPC_AWAITING_MESSAGE.inc()
        try:
            async with asyncio.timeout(self.read_timeout_s):
                request = await anext(aiter(requests), None)
        except TimeoutError:
            raise DeadlineExceeded(
                f"the request message did not arrive within {self.read_timeout_s:g}s of the "
                "headers (REFIT_REQUEST_READ_TIMEOUT_S)"
            ) from None
        finally:
            RPC_AWAITING_MESSAGE.dec()
        if request is None:
            raise InvalidArgument("the call ended without its request message")
        return request

    def _slot(self, rpc: str, streaming: bool) -> _Slot:
        """Takes a slot, or refuses the call at once."""
        if self.calls >= self.max_calls:
            raise ResourceExhausted(
                f"too many calls in progress (REFIT_GRPC_WORKERS={self.max_calls}); retry later"
            )
        if streaming and self.streams >= self.max_streams:
            raise ResourceExhausted(
                f"too many streaming calls in progress (REFIT_MAX_STREAMS={self.max_streams}); "
                "retry later"
            )
        return _Slot(self, rpc, streaming)


class _Slot:
    """A call's place among ``max_calls`` (and ``max_streams``), taken on the event loop."""

    def __init__(self, door: FrontDoor, rpc: str, streaming: bool) -> None:
        self.door, self.rpc, self.streaming = door, rpc, streaming
        self.loop = asyncio.get_running_loop()
        door.calls += 1
        door.streams += streaming
        RPC_IN_FLIGHT.labels(rpc).inc()

    def free_after(self, work: Future) -> None:
        """Frees the slot once ``work`` is done, even if the call ended first (a cancelled call's
        thread still runs until the servicer returns). Scheduled before the answer is sent:
        callbacks run in the order they were added, and the caller's await adds its own later."""
        work.add_done_callback(lambda _: self.loop.call_soon_threadsafe(self._free))

    def _free(self) -> None:
        self.door.calls -= 1
        self.door.streams -= self.streaming
        RPC_IN_FLIGHT.labels(self.rpc).dec()


class _SyncRequests:
    """A streaming call's requests as a blocking iterator, for the servicer's threads."""

    def __init__(self, requests: AsyncIterator, loop: asyncio.AbstractEventLoop) -> None:
        self._requests = aiter(requests)
        self._loop = loop

    def __iter__(self) -> Iterator:
        return self

    def __next__(self) -> Any:
        future = asyncio.run_coroutine_threadsafe(anext(self._requests, _END), self._loop)
        try:
            request = future.result()
        except (Exception, asyncio.CancelledError):
            raise StopIteration from None  # the call ended (grpc raises its own kinds): no more
        if request is _END:
            raise StopIteration
        return request


def _bound(rid: str, fn: Callable, *args: Any) -> Any:
    with logs.bound(logs.request_id, rid):
        return fn(*args)


def _denied(rpc: str, reason: str, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler that answers ``code`` without reading the request: request-streaming, since
    grpc reads a unary request before it calls the handler."""
    AUTH_FAILURES.labels(rpc or "other", reason).inc()
    _done(rpc, "", code, time.perf_counter())

    async def deny(requests: AsyncIterator, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    return grpc.stream_stream_rpc_method_handler(deny)


def _done(rpc: str, rid: str, code: grpc.StatusCode, start: float) -> None:
    seconds = time.perf_counter() - start
    record_call(rpc, code, seconds)
    log_call(rpc, rid, code, seconds)
