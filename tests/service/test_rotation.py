"""The readiness rule (service/rotation.py) as pure logic: which replicas are in the rotation,
which defaults are a model's problem, and when the service is ready. The integration tests
(test_readiness.py, test_availability.py, test_replicas.py) run it with real components."""

from __future__ import annotations

from service.rotation import FAILED, PENDING, REGISTERED, Registration, Registrations, decide

A, B = "ts-a:7071", "ts-b:7071"
DEFAULTS = {"imagenet": "1", "cats": "3"}


def states(**by_model: dict[str, str]) -> Registrations:
    """model=...: {replica: state} for its default in DEFAULTS."""
    return {
        (model, DEFAULTS[model]): {
            replica: Registration(state, "boom" if state == FAILED else "", replica=replica)
            for replica, state in replicas.items()
        }
        for model, replicas in by_model.items()
    }


def test_cold_start_nothing_loaded_yet_is_not_ready() -> None:
    """Pending is not failed: before anything is registered, no replica is in line."""
    rotation = decide(DEFAULTS, {}, {A: True, B: True})
    assert rotation.in_line == frozenset() and not rotation.ready
    assert rotation.required == {"imagenet", "cats"} and rotation.refused == {}
    pending = states(imagenet={A: PENDING, B: PENDING}, cats={A: PENDING, B: PENDING})
    assert not decide(DEFAULTS, pending, {A: True, B: True}).ready


def test_a_replica_serving_every_default_is_in_line() -> None:
    loaded = states(imagenet={A: REGISTERED, B: REGISTERED}, cats={A: REGISTERED, B: PENDING})
    rotation = decide(DEFAULTS, loaded, {A: True, B: True})
    assert rotation.in_line == {A} and rotation.ready


def test_a_default_refused_everywhere_is_the_models_problem_not_readiness() -> None:
    loaded = states(imagenet={A: REGISTERED, B: REGISTERED}, cats={A: FAILED, B: FAILED})
    rotation = decide(DEFAULTS, loaded, {A: True, B: True})
    assert rotation.in_line == {A, B} and rotation.required == {"imagenet"}
    assert "v3" in rotation.refused["cats"] and "boom" in rotation.refused["cats"]


def test_a_default_refused_on_one_replica_only_keeps_that_replica_out() -> None:
    loaded = states(imagenet={A: REGISTERED, B: REGISTERED}, cats={A: FAILED, B: REGISTERED})
    rotation = decide(DEFAULTS, loaded, {A: True, B: True})
    assert rotation.in_line == {B} and rotation.refused == {}


def test_only_reachable_replicas_count() -> None:
    loaded = states(imagenet={A: REGISTERED, B: PENDING}, cats={A: FAILED, B: PENDING})
    rotation = decide(DEFAULTS, loaded, {A: True, B: False})
    assert rotation.in_line == {A} and set(rotation.refused) == {"cats"}
    assert not decide(DEFAULTS, loaded, {A: False, B: False}).ready


def test_while_the_registry_cannot_be_read_refusals_are_not_decided_again() -> None:
    """A registration failing during a store outage may be the store's fault: only defaults
    refused before the outage stay refused; the others are required (a replica lacking them,
    say one that restarted, cannot answer for them)."""
    loaded = states(imagenet={A: FAILED, B: REGISTERED}, cats={A: FAILED, B: FAILED})
    before = {"cats": "its default v3 cannot be loaded: ..."}
    rotation = decide(DEFAULTS, loaded, {A: True, B: True}, refused_before=before)
    assert set(rotation.refused) == {"cats"} and rotation.in_line == {B}
    restarted = states(imagenet={A: FAILED, B: FAILED}, cats={A: FAILED, B: FAILED})
    assert not decide(DEFAULTS, restarted, {A: True, B: True}, refused_before=before).ready


def test_no_defaults_every_reachable_replica_is_in_line() -> None:
    assert decide({}, {}, {A: True, B: False}).in_line == {A}
