"""Typed, frozen service configuration, read once from the environment at start-up."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from refit import shared_settings as shared
from refit.settings import field_for, from_env, nested, setting
from refit.storage import StorageSettings
from refit.torchserve import Targets
from refit.torchserve.keys import key_source
from service.auth import AuthSettings

MiB = 1 << 20


@dataclass(frozen=True)
class TlsSettings:
    """TLS on the public port: a server certificate, and client certificates when a client CA
    is given (then required). Unset: plaintext, for loopback and private networks only."""

    cert_file: Path | None = setting(
        "REFIT_TLS_CERT_FILE",
        None,
        "server certificate (PEM); set: the API port uses TLS",
        parse=Path,
    )
    key_file: Path | None = setting(
        "REFIT_TLS_KEY_FILE", None, "the server certificate's private key (PEM)", parse=Path
    )
    client_ca_file: Path | None = setting(
        "REFIT_TLS_CLIENT_CA_FILE",
        None,
        "CA of the client certificates; set: every client must present one (mutual TLS)",
        parse=Path,
    )

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("TLS needs both REFIT_TLS_CERT_FILE and REFIT_TLS_KEY_FILE")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError("REFIT_TLS_CLIENT_CA_FILE needs REFIT_TLS_CERT_FILE and _KEY_FILE")

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None

    def server_credentials(self) -> grpc.ServerCredentials:
        client_ca = self.client_ca_file.read_bytes() if self.client_ca_file else None
        return grpc.ssl_server_credentials(
            [(self.key_file.read_bytes(), self.cert_file.read_bytes())],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )


@dataclass(frozen=True)
class ServiceSettings:
    """The front door's configuration (``python -m service.server``)."""

    grpc_address: str = field_for(shared.GRPC_ADDRESS)
    health_address: str = field_for(shared.HEALTH_ADDRESS)
    metrics_address: str = field_for(shared.METRICS_ADDRESS)
    torchserve_inference: str = field_for(shared.TORCHSERVE_INFERENCE)
    torchserve_management: str = field_for(shared.TORCHSERVE_MANAGEMENT)
    torchserve_management_rest: str = setting(
        "REFIT_TORCHSERVE_MANAGEMENT_REST",
        "",
        "TorchServe's REST management API, one per replica, for scaling idle versions to 0 "
        "workers; empty: versions are never scaled down",
    )
    torchserve_metrics: str = setting(
        "REFIT_TORCHSERVE_METRICS",
        "",
        "TorchServe's metrics API, one per replica: its inference counters, which every service "
        "replica's Predicts move, decide which versions are idle; empty: this replica's own",
    )
    torchserve_keys: str = field_for(shared.TORCHSERVE_KEYS)
    bucket: str = field_for(shared.BUCKET)
    max_image_bytes: int = setting(
        "REFIT_MAX_IMAGE_BYTES", 8 * MiB, "largest image a Predict accepts, in bytes"
    )
    max_image_pixels: int = setting(
        "REFIT_MAX_IMAGE_PIXELS",
        40_000_000,
        "most decoded pixels per image; more is refused as a decompression bomb",
    )
    upstream_timeout_s: float = setting(
        "REFIT_UPSTREAM_TIMEOUT_S",
        30.0,
        "seconds per TorchServe inference call, capped by the client's deadline",
    )
    register_timeout_s: float = field_for(shared.REGISTER_TIMEOUT_S)
    reconcile_interval_s: float = setting(
        "REFIT_RECONCILE_INTERVAL_S",
        30.0,
        "seconds between passes that bring TorchServe in line with the registry",
    )
    watch_interval_s: float = setting(
        "REFIT_WATCH_INTERVAL_S",
        1.0,
        "seconds between checks of the registry listing and each TorchServe replica, between "
        "reconcile passes",
    )
    idle_worker_s: float = setting(
        "REFIT_IDLE_WORKER_S",
        300.0,
        "a version that is not a default loses its worker when idle this long",
    )
    candidate_warm_s: float = setting(
        "REFIT_CANDIDATE_WARM_S",
        600.0,
        "a newly published version keeps its worker this many seconds",
    )
    max_warm_workers: int = setting(
        "REFIT_MAX_WARM_WORKERS", 10, "most versions holding a worker at once; 0: no bound"
    )
    scale_up_timeout_s: float = setting(
        "REFIT_SCALE_UP_TIMEOUT_S",
        60.0,
        "seconds a Predict waits for a scaled-down version's worker to start",
    )
    reconcile_retry_s: float = setting(
        "REFIT_RECONCILE_RETRY_S",
        2.0,
        "first wait, in seconds, before retrying a version TorchServe refused",
    )
    reconcile_retry_max_s: float = setting(
        "REFIT_RECONCILE_RETRY_MAX_S", 300.0, "the retry wait doubles up to this many seconds"
    )
    stream_window: int = setting(
        "REFIT_STREAM_WINDOW", 8, "PredictStream images in flight at once per call"
    )
    workers: int = setting(
        "REFIT_GRPC_WORKERS",
        32,
        "servicer threads, and the most authenticated calls in progress at once",
    )
    max_streams: int = setting(
        "REFIT_MAX_STREAMS",
        0,
        "streaming calls at once (unary calls keep the other threads); 0: half of "
        "REFIT_GRPC_WORKERS",
        shown="0 (half the workers)",
    )
    max_connections: int = setting(
        "REFIT_MAX_CONNECTIONS",
        256,
        "connections open at once per server (API, health); one more is refused",
    )
    max_streams_per_connection: int = setting(
        "REFIT_MAX_STREAMS_PER_CONNECTION",
        100,
        "HTTP/2 streams open at once per connection (a client holds the rest back)",
    )
    request_read_timeout_s: float = setting(
        "REFIT_REQUEST_READ_TIMEOUT_S",
        20.0,
        "seconds to receive an authenticated call's message after its headers",
    )
    connection_idle_s: float = setting(
        "REFIT_CONNECTION_IDLE_S",
        300.0,
        "a connection with no call for this many seconds is closed",
    )
    keepalive_s: float = setting(
        "REFIT_KEEPALIVE_S",
        60.0,
        "seconds between the server's pings on each connection (20 s to answer)",
    )
    min_client_ping_s: float = setting(
        "REFIT_MIN_CLIENT_PING_S", 10.0, "a client pinging more often than this is disconnected"
    )
    trainer_address: str = field_for(shared.TRAINER_ADDRESS)
    trainer_timeout_s: float = setting(
        "REFIT_TRAINER_TIMEOUT_S", 10.0, "seconds per unary call to the trainer"
    )
    storage: StorageSettings = nested(StorageSettings)
    auth: AuthSettings = nested(AuthSettings)
    tls: TlsSettings = nested(TlsSettings)

    def __post_init__(self) -> None:
        if self.max_streams == 0:
            object.__setattr__(self, "max_streams", self.workers // 2)
        targets = Targets.parse(  # ValueError: bad targets
            self.torchserve_inference,
            self.torchserve_management,
            self.torchserve_management_rest,
            self.torchserve_metrics,
        )
        key_source(self.torchserve_keys, targets, lambda key: b"")  # ValueError: bad keys
        if self.idle_worker_s <= 0 or self.scale_up_timeout_s <= 0 or self.max_warm_workers < 0:
            raise ValueError(
                "REFIT_IDLE_WORKER_S and REFIT_SCALE_UP_TIMEOUT_S must be > 0 and "
                f"REFIT_MAX_WARM_WORKERS >= 0 (got {self.idle_worker_s}, "
                f"{self.scale_up_timeout_s}, {self.max_warm_workers})"
            )
        if self.watch_interval_s <= 0:
            raise ValueError(f"REFIT_WATCH_INTERVAL_S must be > 0 (got {self.watch_interval_s})")
        front_door = (
            self.max_connections,
            self.max_streams_per_connection,
            self.request_read_timeout_s,
            self.connection_idle_s,
            self.keepalive_s,
            self.min_client_ping_s,
        )
        if min(front_door) <= 0:
            raise ValueError(
                "REFIT_MAX_CONNECTIONS, REFIT_MAX_STREAMS_PER_CONNECTION, "
                "REFIT_REQUEST_READ_TIMEOUT_S, "
                "REFIT_CONNECTION_IDLE_S, REFIT_KEEPALIVE_S and REFIT_MIN_CLIENT_PING_S must be "
                f"> 0 (got {', '.join(f'{v:g}' for v in front_door)})"
            )
        if not 0 < self.max_streams < self.workers:
            raise ValueError(
                f"REFIT_MAX_STREAMS ({self.max_streams}) must be between 1 and "
                f"REFIT_GRPC_WORKERS - 1 ({self.workers - 1}): unary calls need threads too"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServiceSettings:
        return from_env(cls, env)
