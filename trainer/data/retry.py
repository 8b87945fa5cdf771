"""Bounded retries with exponential backoff and full jitter for object-store reads.

The minio client already retries a few connection errors and 5xx replies inside urllib3; this layer
adds a longer, jittered budget on top (refit.retry's schedule and loop) and turns exhaustion into a
``ReadFailed`` naming the object.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from refit.retry import Backoff, retry_call
from refit.storage import NoSuchBucket, NoSuchObject, StoreUnreachable
from trainer.data.errors import ReadFailed

log = logging.getLogger(__name__)
T = TypeVar("T")

# S3 error codes that mean "try again later", not "your request is wrong".
TRANSIENT_S3_CODES = frozenset(
    {
        "SlowDown",
        "SlowDownRead",
        "InternalError",
        "ServiceUnavailable",
        "RequestTimeout",
        "OperationAborted",
        "XMinioServerNotInitialized",
    }
)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 6
    base_delay_s: float = 0.1
    max_delay_s: float = 5.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.base_delay_s < 0 or self.max_delay_s < self.base_delay_s:
            raise ValueError(f"invalid retry policy {self}")

    @property
    def backoff(self) -> Backoff:
        return Backoff(self.base_delay_s, self.max_delay_s, jitter=True)


def is_transient(exc: BaseException) -> bool:
    """Connection resets, timeouts, 5xx and SlowDown are worth retrying; 4xx are not."""
    from minio.error import InvalidResponseError, S3Error, ServerError
    from urllib3.exceptions import HTTPError

    if isinstance(exc, S3Error):
        return exc.code in TRANSIENT_S3_CODES
    if isinstance(exc, StoreUnreachable):  # refit.storage's form of the errors below
        return True
    if isinstance(exc, (ServerError, HTTPError, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, InvalidResponseError):
        return exc._code >= 500  # minio keeps the HTTP status only in this attribute
    return False


def is_transient_or_missing(exc: BaseException) -> bool:
    """For objects we just listed: a missing object or bucket can be a server that restarted or
    failed over and is not caught up yet, so it gets the same bounded retries."""
    return isinstance(exc, (NoSuchObject, NoSuchBucket)) or is_transient(exc)


def call_with_retry(
    fn: Callable[[], T],
    *,
    what: str,
    policy: RetryPolicy,
    retry_if: Callable[[BaseException], bool] = is_transient,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
) -> T:
    """Call ``fn`` until it succeeds, fails with a non-retryable error, or the budget runs out."""

    def wait(exc: Exception, attempt: int, delay: float) -> None:
        if attempt == policy.max_attempts:
            raise ReadFailed(
                f"gave up on {what} after {policy.max_attempts} attempts: {_describe(exc)}"
            ) from exc
        log.warning("retrying %s in %.2fs after %s", what, delay, _describe(exc))
        sleep(delay)

    return retry_call(fn, retry_if=retry_if, backoff=policy.backoff, wait=wait, rng=rng)


def _describe(exc: BaseException) -> str:
    return getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
