from __future__ import annotations

import random

import pytest
from minio.error import S3Error, ServerError
from urllib3.exceptions import MaxRetryError, ProtocolError

from refit.storage import NoSuchBucket, NoSuchObject
from trainer.data.errors import ReadFailed
from trainer.data.retry import (
    RetryPolicy,
    call_with_retry,
    is_transient,
    is_transient_or_missing,
)


def s3_error(code: str) -> S3Error:
    return S3Error(None, code, "message", "resource", "request-id", "host-id")


class Flaky:
    """Fails with the given errors, then returns "ok"."""

    def __init__(self, *errors: Exception) -> None:
        self.errors, self.calls = list(errors), 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


@pytest.mark.parametrize(
    "error",
    [
        s3_error("SlowDown"),
        s3_error("InternalError"),
        s3_error("ServiceUnavailable"),
        ServerError("boom", 503),
        ConnectionResetError("reset by peer"),
        ProtocolError("Connection aborted."),
        MaxRetryError(None, "/k", "refused"),
        TimeoutError("timed out"),
    ],
)
def test_transient_errors(error: Exception) -> None:
    assert is_transient(error)


@pytest.mark.parametrize(
    "error",
    [s3_error("AccessDenied"), s3_error("NoSuchKey"), ValueError("x"), NoSuchObject("gone")],
)
def test_permanent_errors(error: Exception) -> None:
    assert not is_transient(error)


def test_missing_objects_count_as_transient_only_for_listed_reads() -> None:
    assert is_transient_or_missing(NoSuchObject("gone"))
    assert is_transient_or_missing(NoSuchBucket("gone"))
    assert not is_transient_or_missing(s3_error("AccessDenied"))


def test_retries_then_succeeds_with_bounded_jittered_backoff() -> None:
    sleeps: list[float] = []
    fn = Flaky(s3_error("SlowDown"), ConnectionResetError(), ServerError("x", 500))
    policy = RetryPolicy(max_attempts=4, base_delay_s=0.1, max_delay_s=0.25)
    result = call_with_retry(fn, what="k", policy=policy, sleep=sleeps.append, rng=random.Random(0))
    assert result == "ok" and fn.calls == 4
    assert len(sleeps) == 3
    for attempt, delay in enumerate(sleeps):
        assert 0 <= delay <= min(0.25, 0.1 * 2**attempt)
    assert len(set(sleeps)) == 3  # jittered, not a fixed schedule


def test_gives_up_after_max_attempts_with_a_clear_error() -> None:
    fn = Flaky(*[s3_error("SlowDown")] * 10)
    with pytest.raises(ReadFailed) as err:
        policy = RetryPolicy(max_attempts=3)
        call_with_retry(fn, what="s3://b/k", policy=policy, sleep=lambda _: None)
    assert fn.calls == 3
    assert "s3://b/k" in err.value.message and "3 attempts" in err.value.message


def test_permanent_error_is_raised_at_once() -> None:
    fn = Flaky(s3_error("AccessDenied"))
    with pytest.raises(S3Error):
        call_with_retry(fn, what="k", policy=RetryPolicy(), sleep=lambda _: None)
    assert fn.calls == 1


def test_policy_validation() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(base_delay_s=2.0, max_delay_s=1.0)
