"""Which versions keep a worker (service/workers.py), as pure logic: a recording stand-in for
TorchServe and a clock the test moves. The real thing is tests/service/test_workers.py."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
from prometheus_client import REGISTRY

from refit.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from refit.torchserve import ServedVersion
from service.workers import Observation, WorkerPolicy, Workers

A1, A2, B1, B2 = ("a", "1"), ("a", "2"), ("b", "1"), ("b", "2")
C1, C2 = ("c", "1"), ("c", "2")


class RecordingTorchServe:
    """Scale calls are recorded; ``counts`` (replica -> (model, version) -> requests) stands
    for TorchServe's inference counters when ``metrics`` names replicas, and ``unreadable``
    makes reading them fail."""

    def __init__(
        self,
        start_s: float = 0.0,
        fail: Exception | None = None,
        stop_s: float = 0.0,
        metrics: tuple[str, ...] = (),
    ) -> None:
        self.targets = SimpleNamespace(rest=("127.0.0.1:1",), metrics=metrics)
        self.calls: list[tuple[str, str, int]] = []
        self.start_s, self.fail, self.stop_s = start_s, fail, stop_s
        self.counts: dict[str, dict[tuple[str, str], float]] = {name: {} for name in metrics}
        self.unreadable: Exception | None = None
        self.workers_started: dict[tuple[str, str], tuple[float, bool]] = {}  # (at, ready)
        self.undescribable: Exception | None = None

    def inference_counts(self) -> dict[str, dict[tuple[str, str], float]]:
        if self.unreadable is not None:
            raise self.unreadable
        return {name: dict(counts) for name, counts in self.counts.items()}

    def describe(self, model: str, version: str) -> list[ServedVersion | None]:
        """Every replica alike: the version's worker as ``workers_started`` says (none else)."""
        if self.undescribable is not None:
            raise self.undescribable
        at, ready = self.workers_started.get((model, version), (0.0, True))
        served = ServedVersion(model, version, 1, started_at=at, starting=not ready)
        return [served for _ in self.counts]

    def used(self, replica: str, key: tuple[str, str], times: int = 1) -> None:
        """Predicts through any service (or the publisher) reaching ``replica``."""
        self.counts[replica][key] = self.counts[replica].get(key, 0.0) + times

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


def test_starting_a_default_stops_the_least_recently_used_default_when_only_defaults_are_warm():
    """A promotion, or a Predict for a default the budget stopped: defaults compete by use."""
    clock, torchserve = Clock(), RecordingTorchServe()
    workers = Workers(torchserve, WorkerPolicy(max_warm=2), clock=clock, wall=lambda: 1e9)
    registered = {A1, A2, B1, C1}
    workers.observe(Observation(registered, {A1, B1}, {A1, B1}, {A1, B1, C1}, {}))
    for key in (B1, A1):
        clock.now += 1
        workers.ensure(*key)
    workers.ensure("c", "1")
    assert torchserve.calls == [("b", "1", 0), ("c", "1", 1)]


def budget_refusals() -> float:
    labels = {"reason": "worker_budget"}
    return REGISTRY.get_sample_value("refit_predict_refusals_total", labels) or 0.0


def test_a_version_that_is_not_a_default_never_stops_a_default_to_start() -> None:
    """A predict token naming old versions could evict every model's default (issue 23):
    refused with RESOURCE_EXHAUSTED instead, and nothing is stopped."""
    clock, torchserve = Clock(), RecordingTorchServe()
    workers = workers_with(torchserve, {A1, B1}, {A1, B1}, clock, max_warm=2)
    before = budget_refusals()
    with pytest.raises(ResourceExhausted) as refused:
        workers.ensure("a", "2")
    message = refused.value.message
    assert "a v2" in message and "REFIT_MAX_WARM_WORKERS" in message and "retry later" in message
    assert torchserve.calls == []
    assert workers.holding() == {A1, B1}
    assert budget_refusals() - before == 1


def test_a_version_that_is_not_a_default_never_stops_a_young_candidate_to_start() -> None:
    """A candidate published within candidate_warm_s is being smoke-tested and gated."""
    clock, torchserve = Clock(), RecordingTorchServe()
    workers = Workers(torchserve, WorkerPolicy(max_warm=2), clock=clock, wall=lambda: 1e9)
    young = {B2: 1e9 - 100}
    workers.observe(Observation({A1, A2, B1, B2}, {A1, B2}, {A1, B2}, {A1, B1}, young))
    with pytest.raises(ResourceExhausted, match="a v2"):
        workers.ensure("a", "2")
    assert torchserve.calls == []


def test_when_the_room_would_need_a_default_nothing_is_stopped_at_all() -> None:
    """Two over the budget and one old version to stop: stopping it alone would not make room."""
    clock, torchserve = Clock(), RecordingTorchServe()
    workers = Workers(torchserve, WorkerPolicy(max_warm=2), clock=clock, wall=lambda: 1e9)
    holding = {A1, B1, B2}  # already one over: a default was registered on a full replica
    workers.observe(Observation({A1, A2, B1, B2}, holding, holding, {A1, B1}, {}))
    with pytest.raises(ResourceExhausted):
        workers.ensure("a", "2")
    assert torchserve.calls == []
    assert workers.holding() == holding


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
    """One old version to stop, two versions that are not defaults to start at once: one takes
    its room, the other is refused (it would have to stop a default)."""
    clock, torchserve = Clock(), RecordingTorchServe(start_s=0.2, stop_s=0.3)
    workers = Workers(torchserve, WorkerPolicy(max_warm=3), clock=clock, wall=lambda: 1e9)
    everything = {A1, A2, B1, B2, C1, C2}
    workers.observe(Observation(everything, {A1, B1, B2}, {A1, B1, B2}, {A1, B1}, {}))
    refused: list[ResourceExhausted] = []

    def ensure(key: tuple[str, str]) -> None:
        try:
            workers.ensure(*key)
        except ResourceExhausted as exc:
            refused.append(exc)

    threads = [threading.Thread(target=ensure, args=(key,)) for key in (A2, C2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stops = [call for call in torchserve.calls if call[2] == 0]
    assert stops == [("b", "2", 0)]
    assert len(refused) == 1
    assert len(workers.holding()) == 3 and {A1, B1} <= workers.holding()


# --- idleness from TorchServe's counters, which every service replica's Predicts move ---------


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
