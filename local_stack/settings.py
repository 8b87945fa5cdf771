"""Where the local stack's components listen and keep their state, from the environment: the
same variables the service and the trainer read, so ``make up`` hands each its own."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from local_stack.torchserve import TorchServePorts
from refit import shared_settings as shared
from refit.settings import declare, field_for, from_env, nested, parse_list, setting
from refit.storage import StorageSettings
from refit.tokens import tokens_file

TORCHSERVE_HTTP_PORTS = declare(
    "REFIT_TORCHSERVE_HTTP_PORTS",
    ("8080", "8081", "8082"),
    "the local stack's TorchServe REST ports: inference, management, metrics",
    parse=parse_list,
)


@dataclass(frozen=True)
class StackSettings:
    storage: StorageSettings = nested(StorageSettings)
    bucket: str = field_for(shared.BUCKET)
    grpc_address: str = field_for(shared.GRPC_ADDRESS)
    health_address: str = field_for(shared.HEALTH_ADDRESS)
    metrics_address: str = field_for(shared.METRICS_ADDRESS)
    prometheus_address: str = setting(
        "REFIT_PROMETHEUS_ADDRESS", "127.0.0.1:9090", "the local stack's Prometheus, when installed"
    )
    scrape_interval: str = "15s"
    trainer_address: str = field_for(shared.TRAINER_ADDRESS)
    trainer_health_address: str = field_for(shared.TRAINER_HEALTH_ADDRESS)
    trainer_metrics_address: str = field_for(shared.TRAINER_METRICS_ADDRESS)
    torchserve: TorchServePorts = field(default_factory=TorchServePorts)

    @property
    def data_dir(self) -> Path:
        return self.storage.data_dir.resolve()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StackSettings:
        env = os.environ if env is None else env
        return from_env(cls, env, torchserve=torchserve_ports(env))

    @property
    def torchserve_home(self) -> Path:
        """TorchServe's configuration, model store, logs and keys."""
        return self.data_dir / "torchserve"

    def storage_url(self) -> str:
        """The URL prefix of every archive TorchServe may fetch."""
        if self.storage.endpoint:
            return self.storage.endpoint
        return (self.data_dir / "objects").as_uri()

    def scrape_targets(self) -> dict[str, str]:
        return {
            "refit-service": self.metrics_address,
            "refit-trainer": self.trainer_metrics_address,
            "torchserve": f"127.0.0.1:{self.torchserve.metrics}",
        }

    def service_env(self) -> dict[str, str]:
        return {
            **os.environ,
            "REFIT_DATA_DIR": str(self.data_dir),
            "REFIT_BUCKET": self.bucket,
            "REFIT_GRPC_ADDRESS": self.grpc_address,
            "REFIT_HEALTH_ADDRESS": self.health_address,
            "REFIT_METRICS_ADDRESS": self.metrics_address,
            "REFIT_TORCHSERVE_INFERENCE": f"127.0.0.1:{self.torchserve.grpc_inference}",
            "REFIT_TORCHSERVE_MANAGEMENT": f"127.0.0.1:{self.torchserve.grpc_management}",
            "REFIT_TORCHSERVE_MANAGEMENT_REST": f"127.0.0.1:{self.torchserve.management}",
            "REFIT_TORCHSERVE_METRICS": f"127.0.0.1:{self.torchserve.metrics}",
            # TorchServe's keys: its key file, which its keeper keeps current (torchserve_home).
            "REFIT_TORCHSERVE_KEYS": f"file:{self.torchserve_home / 'key_file.json'}",
            "REFIT_TRAINER_ADDRESS": self.trainer_address,
            "REFIT_TRAINER_GRPC_ADDRESS": self.trainer_address,
            "REFIT_TRAINER_HEALTH_ADDRESS": self.trainer_health_address,
            "REFIT_TRAINER_METRICS_ADDRESS": self.trainer_metrics_address,
            "REFIT_TOKENS_FILE": str(tokens_file(self.data_dir)),  # API tokens (refit.tokens)
        }


def torchserve_ports(env: Mapping[str, str]) -> TorchServePorts:
    """The REST ports, and the gRPC ones from the addresses the service is given."""
    http = TORCHSERVE_HTTP_PORTS.value(env)
    grpc_ports = (
        port(shared.TORCHSERVE_INFERENCE.name, shared.TORCHSERVE_INFERENCE.value(env)),
        port(shared.TORCHSERVE_MANAGEMENT.name, shared.TORCHSERVE_MANAGEMENT.value(env)),
    )
    if len(http) != 3:
        raise ValueError(f"{TORCHSERVE_HTTP_PORTS.name} needs 3 ports, got {','.join(http)!r}")
    return TorchServePorts(*(port(TORCHSERVE_HTTP_PORTS.name, p) for p in http), *grpc_ports)


def port(name: str, address: str) -> int:
    """The port of ``host:port`` (or of a bare port)."""
    try:
        return int(address.rpartition(":")[2])
    except ValueError:
        raise ValueError(f"{name}={address!r} has no port number") from None
