from __future__ import annotations

import threading
import time

import pytest

from trainer.data.prefetch import prefetch


def test_keeps_input_order_with_uneven_latency() -> None:
    def slow(i: int) -> int:
        time.sleep(0.001 * (7 - i % 7))
        return i * i

    assert list(prefetch(slow, range(50), in_flight=8)) == [(i, i * i) for i in range(50)]


def test_never_more_than_in_flight_calls_at_once() -> None:
    lock, running, peak = threading.Lock(), [0], [0]

    def work(i: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.002)
        with lock:
            running[0] -= 1
        return i

    assert [i for i, _ in prefetch(work, range(60), in_flight=3)] == list(range(60))
    assert 2 <= peak[0] <= 3


def test_bounded_lookahead_on_a_slow_consumer() -> None:
    started: list[int] = []
    stream = prefetch(lambda i: started.append(i) or i, range(1000), in_flight=4)
    next(stream)
    time.sleep(0.05)
    assert len(started) <= 5
    stream.close()


def test_errors_surface_in_order() -> None:
    def fail_on_3(i: int) -> int:
        if i == 3:
            raise OSError("boom")
        return i

    stream = prefetch(fail_on_3, range(10), in_flight=4)
    assert [next(stream)[0] for _ in range(3)] == [0, 1, 2]
    with pytest.raises(OSError, match="boom"):
        next(stream)


@pytest.mark.parametrize("per_task", [2, 5])
def test_tasks_of_several_items_keep_order_and_concurrency(per_task: int) -> None:
    lock, running, peak = threading.Lock(), [0], [0]

    def work(i: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.001 * (3 - i % 3))
        with lock:
            running[0] -= 1
        return -i

    got = list(prefetch(work, range(43), in_flight=3, per_task=per_task))
    assert got == [(i, -i) for i in range(43)] and 2 <= peak[0] <= 3


def test_an_error_inside_a_task_surfaces_at_its_item() -> None:
    calls: list[int] = []

    def fail_on_5(i: int) -> int:
        calls.append(i)
        if i == 5:
            raise OSError("boom")
        return i

    stream = prefetch(fail_on_5, range(20), in_flight=1, per_task=4)
    assert [next(stream)[0] for _ in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(OSError, match="boom"):
        next(stream)
    assert not {6, 7} & set(calls)  # the task of items 4-7 stopped at its error
