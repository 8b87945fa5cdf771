"""Which versions keep a worker (service/workers.py), as pure logic: a recording stand-in for
TorchServe and a clock the test moves. The real thing is tests/service/test_workers.py."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from refit.errors import DeadlineExceeded, Unavailable
from service.workers import Observation, WorkerPolicy, Workers

A1, A2, B1, B2 = ("a", "1"), ("a", "2"), ("b", "1"), ("b", "2")


class RecordingTorchServe:
    def __init__(
        self, start_s: float = 0.0, fail: Exception | None = None, stop_s: float = 0.0
    ) -> None:
        self.targets = SimpleNamespace(rest=("127.0.0.1:1",))
        self.calls: list[tuple[str, str, int]] = []
        self.start_s, self.fail, self.stop_s = start_s, fail, stop_s

    def scale(self, model: str, version: str, workers: int, timeout_s: float) -> None:
        self.calls.append((model, version, workers))
        time.sleep(0 if workers else self.stop_s)
        if workers:
            time.sleep(self.start_s)
            if self.fail:
                raise self.fail


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def workers_with(
    torchserve: RecordingTorchServe, holding: set, defaults: set, clock: Clock, **policy
) -> Workers:
    workers = Workers(torchserve, WorkerPolicy(**policy), clock=clock, wall=lambda: 1e9)
    registered = {A1, A2, B1, B2}
    workers.observe(Observation(registered, holding, holding, defaults, {}))
    return workers


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


def test_the_budget_stops_the_least_recently_used_non_default_first() -> None:
    clock, torchserve = Clock(), RecordingTorchServe()
    workers = workers_with(torchserve, {A1, A2, B1}, {A1, B1}, clock, max_warm=3)
    for key in (A2, A1, B1):  # A2 is the least recently used, but a default goes after it
        clock.now += 1
        workers.ensure(*key)
    workers.ensure("b", "2")
    assert torchserve.calls == [("a", "2", 0), ("b", "2", 1)]
    workers.ensure("a", "2")  # full again: B2 goes, used last but not a default
    assert torchserve.calls[-2:] == [("b", "2", 0), ("a", "2", 1)]
    assert workers.holding() == {A1, A2, B1}


def test_the_budget_stops_young_candidates_after_other_non_defaults() -> None:
    """A version published within candidate_warm_s is being smoke-tested and gated: it goes
    after older versions that are not a default, even when those were used more recently."""
    clock, torchserve = Clock(), RecordingTorchServe()
    workers = Workers(torchserve, WorkerPolicy(max_warm=3), clock=clock, wall=lambda: 1e9)
    young = {A2: 1e9 - 100, B2: 1e9 - 3600}  # A2 published 100 s ago, B2 an hour ago
    workers.observe(Observation({A1, A2, B2, B1}, {A1, A2, B2}, {A1, A2, B2}, {A1}, young))
    for key in (A2, B2, A1):
        clock.now += 1
        workers.ensure(*key)
    workers.ensure("b", "1")
    assert torchserve.calls == [("b", "2", 0), ("b", "1", 1)]


def test_when_only_defaults_are_warm_the_budget_stops_the_least_recently_used() -> None:
    clock, torchserve = Clock(), RecordingTorchServe()
    workers = workers_with(torchserve, {A1, B1}, {A1, B1}, clock, max_warm=2)
    for key in (B1, A1):
        clock.now += 1
        workers.ensure(*key)
    workers.ensure("a", "2")
    assert torchserve.calls == [("b", "1", 0), ("a", "2", 1)]


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


def test_concurrent_starts_under_the_budget_stop_only_what_they_need() -> None:
    clock, torchserve = Clock(), RecordingTorchServe(start_s=0.2, stop_s=0.3)
    workers = Workers(torchserve, WorkerPolicy(max_warm=3), clock=clock, wall=lambda: 1e9)
    everything = {A1, A2, B1, B2, ("c", "1"), ("c", "2")}
    workers.observe(Observation(everything, {A1, B1, B2}, {A1, B1, B2}, {A1, B1}, {}))
    threads = [threading.Thread(target=workers.ensure, args=key) for key in (A2, ("c", "2"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stops = [call for call in torchserve.calls if call[2] == 0]
    assert len(stops) == 2 and ("b", "2", 0) in stops
    assert len(workers.holding()) == 3
