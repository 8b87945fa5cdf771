"""TorchServe targets: one replica, a list, or a DNS name that resolves to many (pure logic)."""

from __future__ import annotations

import pytest

from refit.torchserve import Replica, Targets
from refit.torchserve import targets as torchserve_targets


def test_one_host_port_is_one_replica() -> None:
    targets = Targets.parse("ts:7070", "ts:7071")
    assert targets.replicas() == [Replica("ts:7071", "ts:7070", "ts:7071")]


def test_a_list_pairs_inference_and_management_in_order() -> None:
    targets = Targets.parse("127.0.0.1:1,127.0.0.2:3", "127.0.0.1:2, 127.0.0.2:4")
    assert targets.replicas() == [
        Replica("127.0.0.1:2", "127.0.0.1:1", "127.0.0.1:2"),
        Replica("127.0.0.2:4", "127.0.0.2:3", "127.0.0.2:4"),
    ]


def test_a_dns_name_is_every_address_it_resolves_to_now(monkeypatch: pytest.MonkeyPatch) -> None:
    addresses = ["10.0.0.1", "10.0.0.2"]
    monkeypatch.setattr(torchserve_targets, "resolve_ipv4", lambda host: list(addresses))
    targets = Targets.parse("dns:///torchserve:7070", "dns:///torchserve:7071")
    assert [r.name for r in targets.replicas()] == ["10.0.0.1:7071", "10.0.0.2:7071"]
    assert targets.replicas()[1].inference == "10.0.0.2:7070"
    addresses.append("10.0.0.3")  # a replica joined: seen on the next call
    assert len(targets.replicas()) == 3


@pytest.mark.parametrize(
    ("inference", "management", "message"),
    [
        ("a:1,b:1", "a:2", "lists 2 replicas and _MANAGEMENT 1"),
        ("dns:///ts:1", "ts:2", "must all be dns:///"),
        ("dns:///ts:1", "dns:///other:2", "must name the same host"),
        ("ts", "ts:2", "is not HOST:PORT"),
        ("ts:0", "ts:2", "is not HOST:PORT"),
        ("ts:1,", "ts:2,ts:3", "is not HOST:PORT"),
    ],
)
def test_bad_targets_are_refused_with_what_to_fix(inference, management, message) -> None:
    with pytest.raises(ValueError, match=message):
        Targets.parse(inference, management)


def test_the_service_refuses_bad_targets_at_start() -> None:
    from service.config import ServiceSettings

    env = {
        "REFIT_TORCHSERVE_INFERENCE": "a:1,b:1",
        "REFIT_TORCHSERVE_MANAGEMENT": "a:2",
        "REFIT_INSECURE_NO_AUTH": "true",
    }
    with pytest.raises(ValueError, match="lists 2 replicas"):
        ServiceSettings.from_env(env)


def test_the_rest_management_addresses_pair_with_the_replicas(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    listed = Targets.parse("a:1,b:1", "a:2,b:2", "a:3,b:3")
    assert [r.rest for r in listed.replicas()] == ["a:3", "b:3"]
    assert [r.rest for r in Targets.parse("a:1", "a:2").replicas()] == [""]  # not configured
    monkeypatch.setattr(torchserve_targets, "resolve_ipv4", lambda host: ["10.0.0.1"])
    named = Targets.parse("dns:///ts:7070", "dns:///ts:7071", "dns:///ts:8081")
    assert named.replicas()[0].rest == "10.0.0.1:8081"
    with pytest.raises(ValueError, match="_MANAGEMENT_REST lists 1 replicas"):
        Targets.parse("a:1,b:1", "a:2,b:2", "a:3")


def test_the_metrics_addresses_pair_with_the_replicas(monkeypatch: pytest.MonkeyPatch) -> None:
    """REFIT_TORCHSERVE_METRICS: each replica's metrics API (its inference counters)."""
    listed = Targets.parse("a:1,b:1", "a:2,b:2", metrics="a:4,b:4")
    assert [(r.rest, r.metrics) for r in listed.replicas()] == [("", "a:4"), ("", "b:4")]
    assert [r.metrics for r in Targets.parse("a:1", "a:2", "a:3").replicas()] == [""]
    monkeypatch.setattr(torchserve_targets, "resolve_ipv4", lambda host: ["10.0.0.1", "10.0.0.2"])
    named = Targets.parse(
        "dns:///ts:7070", "dns:///ts:7071", "dns:///ts:8081", metrics="dns:///ts:8082"
    )
    assert [(r.rest, r.metrics) for r in named.replicas()] == [
        ("10.0.0.1:8081", "10.0.0.1:8082"),
        ("10.0.0.2:8081", "10.0.0.2:8082"),
    ]
    with pytest.raises(ValueError, match="_METRICS lists 1 replicas"):
        Targets.parse("a:1,b:1", "a:2,b:2", metrics="a:4")
    with pytest.raises(ValueError, match="must all be dns:///"):
        Targets.parse("dns:///ts:1", "dns:///ts:2", metrics="ts:4")
    with pytest.raises(ValueError, match="must name the same host"):
        Targets.parse("dns:///ts:1", "dns:///ts:2", metrics="dns:///other:4")


def test_the_service_reads_the_metrics_targets() -> None:
    from service.config import ServiceSettings

    env = {
        "REFIT_TORCHSERVE_INFERENCE": "a:1,b:1",
        "REFIT_TORCHSERVE_MANAGEMENT": "a:2,b:2",
        "REFIT_TORCHSERVE_METRICS": "a:4,b:4",
        "REFIT_INSECURE_NO_AUTH": "true",
    }
    assert ServiceSettings.from_env(env).torchserve_metrics == "a:4,b:4"
    with pytest.raises(ValueError, match="_METRICS lists 1 replicas"):
        ServiceSettings.from_env({**env, "REFIT_TORCHSERVE_METRICS": "a:4"})
