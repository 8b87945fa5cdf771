import math
import random

import pytest

from refit.retry import Backoff, retry_call


def test_delay_doubles_from_first_up_to_the_cap() -> None:
    backoff = Backoff(2.0, 10.0)
    assert [backoff.delay(n) for n in range(1, 6)] == [2.0, 4.0, 8.0, 10.0, 10.0]


def test_delay_without_a_cap_keeps_doubling() -> None:
    assert Backoff(10.0).delay(4) == 80.0


def test_delay_of_a_long_failure_streak_stays_at_the_cap() -> None:
    assert Backoff(2.0, 300.0).delay(100_000) == 300.0
    assert Backoff(2.0).delay(100_000) < math.inf


def test_jittered_delay_is_uniform_below_the_schedule() -> None:
    backoff = Backoff(0.1, 0.25, jitter=True)
    rng = random.Random(0)
    delays = [backoff.delay(n, rng) for n in (1, 2, 3, 3, 3)]
    for n, delay in zip((1, 2, 3, 3, 3), delays, strict=True):
        assert 0 <= delay <= Backoff(0.1, 0.25).delay(n)
    assert len(set(delays)) == len(delays)


class Flaky:
    def __init__(self, *errors: Exception) -> None:
        self.errors, self.calls = list(errors), 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def test_retry_call_waits_the_schedule_between_calls() -> None:
    waits: list[tuple[str, int, float]] = []
    fn = Flaky(OSError("a"), OSError("b"))
    result = retry_call(
        fn,
        retry_if=lambda e: isinstance(e, OSError),
        backoff=Backoff(1.0, 1.5),
        wait=lambda exc, attempt, delay: waits.append((str(exc), attempt, delay)),
    )
    assert result == "ok" and fn.calls == 3
    assert waits == [("a", 1, 1.0), ("b", 2, 1.5)]


def test_retry_call_raises_a_rejected_error_at_once() -> None:
    fn = Flaky(ValueError("bad"))
    with pytest.raises(ValueError):
        retry_call(fn, retry_if=lambda e: False, backoff=Backoff(1.0), wait=pytest.fail)
    assert fn.calls == 1


def test_retry_call_stops_when_wait_gives_up() -> None:
    def give_up(exc: Exception, attempt: int, delay: float) -> None:
        if attempt == 2:
            raise RuntimeError(f"gave up after {attempt}")

    fn = Flaky(*[OSError("down")] * 5)
    with pytest.raises(RuntimeError, match="gave up after 2") as err:
        retry_call(fn, retry_if=lambda e: True, backoff=Backoff(0.0), wait=give_up)
    assert fn.calls == 2
    assert isinstance(err.value.__context__, OSError)
