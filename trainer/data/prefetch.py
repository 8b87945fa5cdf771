"""Ordered, bounded prefetch: at most ``in_flight`` calls of ``fn`` run ahead of the consumer."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def prefetch(fn: Callable[[T], R], items: Iterable[T], in_flight: int) -> Iterator[tuple[T, R]]:
    """Yield ``(item, fn(item))`` in input order; exceptions from ``fn`` surface in order too."""
    if in_flight < 1:
        raise ValueError(f"in_flight must be >= 1, got {in_flight}")
    source = iter(items)
    pool = ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="refit-prefetch")
    pending: deque[tuple[T, Future[R]]] = deque()
    try:
        for item in source:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= in_flight:
                break
        while pending:
            item, future = pending.popleft()
            for following in source:
                pending.append((following, pool.submit(fn, following)))
                break
            yield item, future.result()
    finally:
        # A consumer that stops early must not wait for (possibly retrying) requests.
        pool.shutdown(wait=False, cancel_futures=True)
