"""Idleness from TorchServe's counters, which every service replica's Predicts move
(service/worker_use.py), through ``Workers`` with a recording stand-in for TorchServe."""

from __future__ import annotations

from prometheus_client import REGISTRY

from refit.errors import Unavailable
from service.workers import Observation, WorkerPolicy, Workers
from tests.service.worker_fakes import (
    A1,
    A2,
    B1,
    B2,
    C1,
    Clock,
    RecordingTorchServe,
)


def shared_workers(torchserve: RecordingTorchServe, clock: Clock, idle_s: float = 60) -> Workers:
    """A2 and B2 warm, not defaults, as another service replica left them."""
    workers = Workers(torchserve, WorkerPolicy(idle_s=idle_s), clock=clock, wall=lambda: 1e9)
    holding = {A1, A2, B2}
    workers.observe(Observation({A1, A2, B1, B2}, holding, holding, {A1, B1}, {}))
    workers.stop_idle()  # the first read: what the counters say now
    return workers


def usage_reads(outcome: str) -> float:
    labels = {"outcome": outcome}
    return REGISTRY.get_sample_value("refit_worker_usage_reads_total", labels) or 0.0


def test_a_version_used_only_through_another_service_is_not_idle() -> None:
    """Issue 23: each service judged idleness from its own Predicts, so a second one stopped a
    version the first was serving, every idle period."""
    clock, torchserve = Clock(), RecordingTorchServe(metrics=("ts-a", "ts-b"))
    workers = shared_workers(torchserve, clock)
    for replica in ("ts-a", "ts-b", "ts-a", "ts-b", "ts-a"):  # the other service's traffic
        clock.now += 30
        torchserve.used(replica, A2)
        workers.stop_idle()
    assert torchserve.calls == [("b", "2", 0)]  # B2 only: never used, it went after 60 s
    clock.now += 59
    assert workers.stop_idle() == 0
    clock.now += 1  # 60 s since the counters last moved
    assert workers.stop_idle() == 1
    assert torchserve.calls[-1] == ("a", "2", 0)


def test_a_counter_that_went_down_is_a_restarted_replica_and_its_count_is_new_use() -> None:
    clock, torchserve = Clock(), RecordingTorchServe(metrics=("ts-a",))
    torchserve.used("ts-a", A2, 50)
    workers = shared_workers(torchserve, clock)
    clock.now += 50
    torchserve.counts["ts-a"] = {A2: 3.0}  # restarted, then served 3 Predicts
    assert workers.stop_idle() == 0
    clock.now += 50
    torchserve.counts["ts-a"] = {A2: 0.0}  # restarted again, no Predict since: no use
    assert workers.stop_idle() == 1  # B2, never used
    clock.now += 10  # 60 s since the restarted replica's Predicts were seen
    assert workers.stop_idle() == 1
    assert torchserve.calls == [("b", "2", 0), ("a", "2", 0)]


def test_requests_naming_no_version_count_for_the_default() -> None:
    """TorchServe counts a request without a version under "default"."""
    clock, torchserve = Clock(), RecordingTorchServe(metrics=("ts-a",))
    workers = Workers(torchserve, WorkerPolicy(max_warm=2), clock=clock, wall=lambda: 1e9)
    workers.observe(Observation({A1, B1, C1}, {A1, B1}, {A1, B1}, {A1, B1, C1}, {}))
    workers.stop_idle()
    for key in (B1, A1):  # this service's own Predicts: B1, then A1
        clock.now += 1
        workers.ensure(*key)
    clock.now += 1
    torchserve.used("ts-a", ("b", "default"))  # then b's default, through another service
    workers.stop_idle()
    workers.ensure("c", "1")  # a default: the least recently used default makes room
    assert torchserve.calls == [("a", "1", 0), ("c", "1", 1)]


def test_unreadable_counters_stop_nothing_as_idle_that_round() -> None:
    """Never decide on part of the truth: a replica whose counters cannot be read may be the
    one serving the version."""
    clock, torchserve = Clock(), RecordingTorchServe(metrics=("ts-a", "ts-b"))
    workers = shared_workers(torchserve, clock)
    failed = usage_reads("failed")
    torchserve.unreadable = Unavailable("TorchServe's metrics API on ts-b is unreachable")
    clock.now += 3600
    assert workers.stop_idle() == 0
    assert torchserve.calls == []
    assert usage_reads("failed") - failed == 1
    torchserve.unreadable = None
    ok = usage_reads("ok")
    assert workers.stop_idle() == 2  # readable again, nothing moved: both idle
    assert usage_reads("ok") - ok == 1


class Wall:
    """The wall clock TorchServe's worker start times are read against, moved with ``clock``."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def __call__(self) -> float:
        return 1e9 + self.clock.now


def test_a_worker_another_service_is_starting_is_not_idle_until_idle_s_after() -> None:
    """A start is a use: the caller waiting for it moves TorchServe's counters only once the
    worker is up, and a start may take longer than the idle time."""
    clock, torchserve = Clock(), RecordingTorchServe(metrics=("ts-a",))
    wall = Wall(clock)
    policy = WorkerPolicy(idle_s=60, scale_up_timeout_s=120)
    workers = Workers(torchserve, policy, clock=clock, wall=wall)
    workers.observe(Observation({A1, A2}, {A1, A2}, {A1, A2}, {A1}, {}))
    workers.stop_idle()
    clock.now += 100  # idle by the counters; meanwhile another service stopped and restarts it
    torchserve.workers_started[A2] = (wall() - 70, False)  # starting for 70 s: not READY yet
    assert workers.stop_idle() == 0
    clock.now += 5
    torchserve.workers_started[A2] = (wall() - 75, True)  # up now, its caller not counted yet
    assert workers.stop_idle() == 0
    clock.now += 54  # 59 s since it was last seen starting
    assert workers.stop_idle() == 0
    clock.now += 1
    assert workers.stop_idle() == 1
    assert torchserve.calls == [("a", "2", 0)]


def test_a_worker_started_within_the_idle_time_is_not_idle() -> None:
    """A start this service did not see in progress: its start time is the use."""
    clock, torchserve = Clock(), RecordingTorchServe(metrics=("ts-a",))
    wall = Wall(clock)
    workers = Workers(torchserve, WorkerPolicy(idle_s=60), clock=clock, wall=wall)
    workers.observe(Observation({A1, A2}, {A1, A2}, {A1, A2}, {A1}, {}))
    workers.stop_idle()
    clock.now += 100
    torchserve.workers_started[A2] = (wall() - 10, True)  # started 10 s ago, by someone
    assert workers.stop_idle() == 0
    clock.now += 49
    assert workers.stop_idle() == 0
    clock.now += 1  # 60 s since its start
    assert workers.stop_idle() == 1


def test_a_worker_that_never_gets_ready_is_stopped_once_its_start_has_timed_out() -> None:
    clock, torchserve = Clock(), RecordingTorchServe(metrics=("ts-a",))
    wall = Wall(clock)
    workers = Workers(
        torchserve, WorkerPolicy(idle_s=60, scale_up_timeout_s=30), clock=clock, wall=wall
    )
    workers.observe(Observation({A1, A2}, {A1, A2}, {A1, A2}, {A1}, {}))
    workers.stop_idle()
    clock.now += 100
    torchserve.workers_started[A2] = (wall() - 90, False)  # failing to start for 90 s
    assert workers.stop_idle() == 1


def test_a_version_is_not_stopped_as_idle_when_a_replica_cannot_describe_it() -> None:
    clock, torchserve = Clock(), RecordingTorchServe(metrics=("ts-a",))
    workers = shared_workers(torchserve, clock)
    torchserve.undescribable = Unavailable("TorchServe is unreachable")
    clock.now += 3600
    assert workers.stop_idle() == 0
    torchserve.undescribable = None
    assert workers.stop_idle() == 2
