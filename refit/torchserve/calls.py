"""One call to TorchServe: observed (its time and outcome feed the caller's metrics) and its
failure turned into refit's domain errors, here and nowhere else."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import grpc

from refit.errors import DeadlineExceeded, NotFound, RefitError, ResourceExhausted, Unavailable

# (call name, seconds taken, gRPC code name of a failure or None): feeds each caller's metrics.
CallObserver = Callable[[str, float, str | None], None]
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.keepalive_time_ms", 30_000),
    # A replica that comes back is used again within seconds, not after a backoff of minutes.
    ("grpc.max_reconnect_backoff_ms", 5_000),
]


class ModelNotLoaded(RefitError):
    """TorchServe does not (yet) serve a version the registry has: a reconcile is due."""

    code = grpc.StatusCode.UNAVAILABLE


class NoWorker(RefitError):
    """TorchServe holds the version but runs no worker for it (scaled to 0): scale it up."""

    code = grpc.StatusCode.UNAVAILABLE


class QueueFull(ResourceExhausted):
    """TorchServe's job queue for the version is full: the caller backs off; nothing to scale."""


class KeyRefused(Unavailable):
    """TorchServe refused the key refit holds for it (it restarted, or its keeper replaced the
    keys): read the keys again, then retry. Until then the replica counts as unreachable."""


@contextmanager
def observed(observe: CallObserver, call: str, subject: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    except grpc.RpcError as exc:
        observe(call, time.perf_counter() - start, exc.code().name)
        raise translate(exc, call, subject) from exc
    observe(call, time.perf_counter() - start, None)


def translate(exc: grpc.RpcError, call: str, subject: str) -> RefitError:
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"TorchServe did not answer {call} for {subject} in time")
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(f"TorchServe is unreachable ({details}); retry shortly")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return KeyRefused(
            f"TorchServe refused refit's key for {call} on {subject} ({details}); its keys "
            "changed and the new ones are not readable yet: retry shortly"
        )
    # TorchServe answers an unknown model with INTERNAL "Model not found: NAME" (0.12).
    unknown = code == grpc.StatusCode.INTERNAL and "model not found" in details.lower()
    if call == "predict" and "has no worker" in details:
        return NoWorker(f"{subject} has no worker running in TorchServe (scaled to 0)")
    if code == grpc.StatusCode.NOT_FOUND or unknown:
        if call == "predict":
            return ModelNotLoaded(f"{subject} is published but not loaded in TorchServe yet; retry")
        return NotFound(f"TorchServe has no {subject}: {details}")
    return RefitError(f"TorchServe {call} failed for {subject}: {code.name} {details}")
