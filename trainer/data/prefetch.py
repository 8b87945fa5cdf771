"""Ordered, bounded prefetch: at most ``in_flight`` calls of ``fn`` run ahead of the consumer."""

from __future__ import annotations

import functools
import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def prefetch(
    fn: Callable[[T], R], items: Iterable[T], in_flight: int, per_task: int = 1
) -> Iterator[tuple[T, R]]:
    """Yield ``(item, fn(item))`` in input order; exceptions from ``fn`` surface in order too.

    A thread takes ``per_task`` consecutive items at a time. When a call is cheap (a small image
    from local disk) handing each item to a thread costs more than the call itself; larger tasks
    keep ``in_flight`` calls running with fewer hand-offs, and ``in_flight * per_task`` results
    at most waiting for the consumer."""
    if in_flight < 1 or per_task < 1:
        raise ValueError(f"in_flight and per_task must be >= 1, got {in_flight}, {per_task}")
    source = iter(items)
    tasks = iter(lambda: list(itertools.islice(source, per_task)), [])
    for task, (results, error) in _ordered_map(functools.partial(_call_each, fn), tasks, in_flight):
        yield from zip(task, results, strict=False)  # the items before any error
        if error is not None:
            raise error


def _call_each(fn: Callable[[T], R], task: list[T]) -> tuple[list[R], Exception | None]:
    """Results in order, up to the first error (raised by the consumer when it gets there)."""
    results: list[R] = []
    for item in task:
        try:
            results.append(fn(item))
        except Exception as exc:
            return results, exc
    return results, None


def _ordered_map(fn: Callable[[T], R], items: Iterator[T], in_flight: int) -> Iterator[tuple[T, R]]:
    pool = ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="refit-prefetch")
    pending: deque[tuple[T, Future[R]]] = deque()
    try:
        for item in items:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= in_flight:
                break
        while pending:
            item, future = pending.popleft()
            for following in items:
                pending.append((following, pool.submit(fn, following)))
                break
            yield item, future.result()
    finally:
        # A consumer that stops early must not wait for (possibly retrying) requests.
        pool.shutdown(wait=False, cancel_futures=True)
