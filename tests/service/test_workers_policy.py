"""Which versions keep a worker (service/workers.py), as pure logic: a recording stand-in for
TorchServe and a clock the test moves. The real thing is tests/service/test_workers.py; the budget
is tests/service/test_worker_budget.py, idleness from TorchServe's counters test_worker_use.py."""

from __future__ import annotations

import threading

import pytest

from refit.errors import DeadlineExceeded, Unavailable
from service.workers import Observation, WorkerPolicy, Workers
from tests.service.worker_fakes import (
    A1,
    A2,
    B1,
    Clock,
    RecordingTorchServe,
    workers_with,
)


def test_idle_versions_stop_but_defaults_and_young_candidates_do_not() -> None:
    clock, torchserve = Clock(), RecordingTorchServe()
    workers = Workers(
        torchserve, WorkerPolicy(idle_s=60, candidate_warm_s=600), clock=clock, wall=lambda: 1e9
    )
    young = 1e9 - 100  # published 100 s ago: within candidate_warm_s
    workers.observe(Observation({A1, A2, B1}, {A1, A2, B1}, {A1, A2, B1}, {A1}, {B1: young}))
    clock.now += 59
    assert workers.stop_idle() == 0
    clock.now += 2
    assert workers.stop_idle() == 1
    assert torchserve.calls == [("a", "2", 0)]
    assert workers.holding() == {A1, B1}


def test_a_predict_in_flight_keeps_its_version() -> None:
    clock, torchserve = Clock(), RecordingTorchServe()
    workers = workers_with(torchserve, {A1, A2}, {A1}, clock, idle_s=60)
    with workers.serving("a", "2"):
        clock.now += 120
        assert workers.stop_idle() == 0
    assert workers.stop_idle() == 0  # just used
    clock.now += 61
    assert workers.stop_idle() == 1


def test_concurrent_first_calls_start_one_worker() -> None:
    clock, torchserve = Clock(), RecordingTorchServe(start_s=0.3)
    workers = workers_with(torchserve, {A1}, {A1}, clock)
    threads = [threading.Thread(target=workers.ensure, args=("a", "2")) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert torchserve.calls == [("a", "2", 1)]
    workers.ensure("a", "2")  # now warm: no call
    assert torchserve.calls == [("a", "2", 1)]


def test_a_start_that_takes_too_long_fails_unavailable_and_a_short_deadline_deadline_exceeded():
    clock = Clock()
    slow = workers_with(RecordingTorchServe(start_s=0.5), {A1}, {A1}, clock, scale_up_timeout_s=5)
    with pytest.raises(DeadlineExceeded, match="starting its worker"):
        slow.ensure("a", "2", timeout_s=0.05)
    timing_out = RecordingTorchServe(fail=DeadlineExceeded("TorchServe did not answer"))
    workers = workers_with(timing_out, {A1}, {A1}, clock, scale_up_timeout_s=5)
    with pytest.raises(Unavailable, match="none started within 5s"):
        workers.ensure("a", "2")


def test_defaults_registered_while_the_budget_has_room() -> None:
    workers = Workers(RecordingTorchServe(), WorkerPolicy(max_warm=2))
    assert [workers.default_workers(n) for n in (0, 1, 2)] == [1, 1, 0]
    assert (
        Workers(RecordingTorchServe(), WorkerPolicy(max_warm=0)).default_workers(50) == 1
    )  # no bound
