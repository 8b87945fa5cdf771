"""The warm-worker budget (service/worker_budget.py), alone and through ``Workers`` with a
recording stand-in for TorchServe."""

from __future__ import annotations

import threading

import pytest
from prometheus_client import REGISTRY

from refit.errors import ResourceExhausted
from service.worker_budget import Budget
from service.workers import Observation, WorkerPolicy, Workers
from tests.service.worker_fakes import (
    A1,
    A2,
    B1,
    B2,
    C1,
    C2,
    Clock,
    RecordingTorchServe,
    workers_with,
)


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


def test_the_budget_orders_victims_other_versions_then_young_candidates_then_defaults() -> None:
    budget = Budget(max_warm=2)
    warm = {A1, A2, B1, B2, C1}
    last_used = {A1: 1.0, A2: 5.0, B1: 2.0, B2: 4.0, C1: 3.0}
    choice = dict(warm=warm, stoppable=warm, defaults={A1, B1}, young={B2}, last_used=last_used)
    assert budget.victims(extra=None, **choice) == [C1, A2, B2]


def test_the_budget_refuses_an_ordinary_version_rather_than_stop_a_default() -> None:
    budget = Budget(max_warm=1)
    warm = {A1, C2}
    with pytest.raises(ResourceExhausted, match="all 1 warm workers"):
        budget.victims(
            warm=warm, stoppable={A1}, extra=C2, defaults={A1}, young=set(), last_used={}
        )
    assert (
        Budget(max_warm=0).victims(
            warm=warm, stoppable={A1}, extra=C2, defaults={A1}, young=set(), last_used={}
        )
        == []
    )
