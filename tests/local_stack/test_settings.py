"""Where the local stack's components listen, from the environment."""

from __future__ import annotations

import pytest

from local_stack.settings import StackSettings
from local_stack.torchserve import TorchServePorts


def test_ports_come_from_the_environment() -> None:
    # Parsed only: nothing binds these ports, so fixed numbers cannot collide.
    env = {
        "REFIT_TORCHSERVE_HTTP_PORTS": "18080,18081,18082",
        "REFIT_TORCHSERVE_INFERENCE": "127.0.0.1:17070",
        "REFIT_TORCHSERVE_MANAGEMENT": "127.0.0.1:17071",
        "REFIT_GRPC_ADDRESS": "127.0.0.1:15051",
        "REFIT_HEALTH_ADDRESS": "127.0.0.1:15054",
        "REFIT_PROMETHEUS_ADDRESS": "127.0.0.1:19090",
        "REFIT_TRAINER_HEALTH_ADDRESS": "127.0.0.1:15053",
    }
    settings = StackSettings.from_env(env)
    assert settings.torchserve == TorchServePorts(18080, 18081, 18082, 17070, 17071)
    assert settings.grpc_address == "127.0.0.1:15051"
    # The trainer serves health where `make up` waits for it.
    assert settings.service_env()["REFIT_TRAINER_HEALTH_ADDRESS"] == "127.0.0.1:15053"
    assert settings.service_env()["REFIT_HEALTH_ADDRESS"] == "127.0.0.1:15054"  # and the service
    assert settings.scrape_targets()["torchserve"] == "127.0.0.1:18082"
    # The service reads TorchServe's inference counters there (idle workers, service/workers.py).
    assert settings.service_env()["REFIT_TORCHSERVE_METRICS"] == "127.0.0.1:18082"


def test_defaults_are_the_documented_ports() -> None:
    settings = StackSettings.from_env({})
    assert settings.torchserve == TorchServePorts()
    assert (settings.grpc_address, settings.prometheus_address) == (
        "127.0.0.1:50051",
        "127.0.0.1:9090",
    )


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"REFIT_TORCHSERVE_HTTP_PORTS": "8080,8081"}, "REFIT_TORCHSERVE_HTTP_PORTS"),
        ({"REFIT_TORCHSERVE_HTTP_PORTS": "8080,x,8082"}, "REFIT_TORCHSERVE_HTTP_PORTS"),
        ({"REFIT_TORCHSERVE_INFERENCE": "127.0.0.1:grpc"}, "REFIT_TORCHSERVE_INFERENCE"),
    ],
)
def test_a_bad_port_names_its_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        StackSettings.from_env(env)
