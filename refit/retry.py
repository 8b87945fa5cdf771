"""The one retry schedule: exponential backoff with a cap, optionally with full jitter, and a loop
that calls a function until it succeeds or its caller's ``wait`` gives up.

Callers whose retries span calls (a reconciler that reschedules itself, a job whose attempts are
stored in its record) use ``Backoff.delay`` alone; the others use ``retry_call``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
MAX_DOUBLINGS = 64  # past this the cap has long been reached; keeps 2**n a float-sized number
# Called after a retryable failure with (error, attempt, delay): sleeps ``delay``, or raises to
# give up. Called inside the ``except`` block, so what it raises carries the error as context.
WaitFn = Callable[[Exception, int, float], None]


@dataclass(frozen=True)
class Backoff:
    """``first_s`` after the first failure, doubling after each one, at most ``max_s``; with
    ``jitter``, uniform in [0, that] (full jitter: many clients retrying do not stampede)."""

    first_s: float
    max_s: float = math.inf
    jitter: bool = False

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """The wait after the ``attempt``-th failure in a row (1 for the first)."""
        doublings = min(max(attempt - 1, 0), MAX_DOUBLINGS)
        ceiling = min(self.first_s * 2**doublings, self.max_s)
        return (rng or random).uniform(0.0, ceiling) if self.jitter else ceiling


def retry_call(
    fn: Callable[[], T],
    *,
    retry_if: Callable[[Exception], bool],
    backoff: Backoff,
    wait: WaitFn,
    rng: random.Random | None = None,
) -> T:
    """Calls ``fn`` until it returns. An error ``retry_if`` rejects is raised at once; after any
    other, ``wait(error, attempt, delay)`` sleeps before the next call or raises to give up."""
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as exc:
            if not retry_if(exc):
                raise
            attempt += 1
            wait(exc, attempt, backoff.delay(attempt, rng))
