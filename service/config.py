"""Typed, frozen service configuration, read once from the environment at start-up."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from refit.storage import StorageSettings
from refit.torchserve import Targets
from refit.torchserve.keys import key_source
from service.auth import AuthSettings

MiB = 1 << 20


@dataclass(frozen=True)
class TlsSettings:
    """TLS on the public port: a server certificate, and client certificates when a client CA
    is given (then required). Unset: plaintext, for loopback and private networks only."""

    cert_file: Path | None = None
    key_file: Path | None = None
    client_ca_file: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("TLS needs both REFIT_TLS_CERT_FILE and REFIT_TLS_KEY_FILE")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError("REFIT_TLS_CLIENT_CA_FILE needs REFIT_TLS_CERT_FILE and _KEY_FILE")

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None

    @classmethod
    def from_env(cls, env: dict[str, str]) -> TlsSettings:
        def path(name: str) -> Path | None:
            return Path(env[name]) if env.get(name) else None

        return cls(
            path("REFIT_TLS_CERT_FILE"),
            path("REFIT_TLS_KEY_FILE"),
            path("REFIT_TLS_CLIENT_CA_FILE"),
        )

    def server_credentials(self) -> grpc.ServerCredentials:
        client_ca = self.client_ca_file.read_bytes() if self.client_ca_file else None
        return grpc.ssl_server_credentials(
            [(self.key_file.read_bytes(), self.cert_file.read_bytes())],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )


@dataclass(frozen=True)
class ServiceSettings:
    grpc_address: str = "127.0.0.1:50051"
    # grpc.health.v1 alone, on a server and thread of its own (probes); also on grpc_address
    health_address: str = "127.0.0.1:50054"
    metrics_address: str = "127.0.0.1:9101"
    torchserve_inference: str = "127.0.0.1:7070"
    torchserve_management: str = "127.0.0.1:7071"
    # TorchServe's REST management API, for scaling versions to 0 workers ("": not scaled down)
    torchserve_management_rest: str = ""
    # TorchServe's metrics API: its per-version inference counters, which every service
    # replica's Predicts move, decide which versions are idle ("": this replica's own Predicts)
    torchserve_metrics: str = ""
    # Where each TorchServe replica's keys are (refit/torchserve/keys.py): "store", "file:PATH,..."
    # or "" (only for a TorchServe with its token authorization off)
    torchserve_keys: str = ""
    bucket: str = "refit"
    max_image_bytes: int = 8 * MiB
    max_image_pixels: int = 40_000_000  # more decoded pixels than this: a decompression bomb
    upstream_timeout_s: float = 30.0  # per TorchServe inference call, capped by the client deadline
    register_timeout_s: float = 180.0  # registering a model starts a worker: seconds, not ms
    reconcile_interval_s: float = 30.0
    # Between passes: the registry's listing and each TorchServe replica are checked this often
    # (a promotion through another service replica, a replica that died, restarted or joined).
    watch_interval_s: float = 1.0
    idle_worker_s: float = 300.0  # a version that is not a default loses its worker when idle
    candidate_warm_s: float = 600.0  # a new version keeps its worker this long after publishing
    max_warm_workers: int = 10  # most versions holding a worker at once (0: no bound)
    scale_up_timeout_s: float = 60.0  # a Predict waits this long for a version's worker to start
    reconcile_retry_s: float = 2.0  # first wait before retrying a version TorchServe refused
    reconcile_retry_max_s: float = 300.0  # the backoff doubles up to this
    stream_window: int = 8  # PredictStream images in flight at once per call
    workers: int = 32  # servicer threads, and the most authenticated calls in progress at once
    # Streaming calls at once (from_env: half the workers): unary calls keep the other threads.
    max_streams: int = 16
    # Connections open at once per server (API, health): one more is refused (UNAVAILABLE).
    max_connections: int = 256
    # Per connection: HTTP/2 streams open at once (a client holds the rest until one ends).
    max_streams_per_connection: int = 100
    request_read_timeout_s: float = 20.0  # an authenticated call's message, after its headers
    connection_idle_s: float = 300.0  # a connection with no call for this long is closed
    keepalive_s: float = 60.0  # the server pings each connection this often (20 s to answer)
    min_client_ping_s: float = 10.0  # a client pinging more often is disconnected
    trainer_address: str = "127.0.0.1:50052"  # the trainer's internal API
    trainer_timeout_s: float = 10.0  # per unary call to the trainer
    storage: StorageSettings = field(default_factory=StorageSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)

    def __post_init__(self) -> None:
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
    def from_env(cls, env: dict[str, str] | None = None) -> ServiceSettings:
        env = dict(os.environ if env is None else env)
        defaults = cls()
        workers = int(env.get("REFIT_GRPC_WORKERS", defaults.workers))
        return cls(
            grpc_address=env.get("REFIT_GRPC_ADDRESS", defaults.grpc_address),
            health_address=env.get("REFIT_HEALTH_ADDRESS", defaults.health_address),
            metrics_address=env.get("REFIT_METRICS_ADDRESS", defaults.metrics_address),
            torchserve_inference=env.get(
                "REFIT_TORCHSERVE_INFERENCE", defaults.torchserve_inference
            ),
            torchserve_management=env.get(
                "REFIT_TORCHSERVE_MANAGEMENT", defaults.torchserve_management
            ),
            torchserve_management_rest=env.get(
                "REFIT_TORCHSERVE_MANAGEMENT_REST", defaults.torchserve_management_rest
            ),
            torchserve_metrics=env.get("REFIT_TORCHSERVE_METRICS", defaults.torchserve_metrics),
            torchserve_keys=env.get("REFIT_TORCHSERVE_KEYS", defaults.torchserve_keys),
            idle_worker_s=float(env.get("REFIT_IDLE_WORKER_S", defaults.idle_worker_s)),
            candidate_warm_s=float(env.get("REFIT_CANDIDATE_WARM_S", defaults.candidate_warm_s)),
            max_warm_workers=int(env.get("REFIT_MAX_WARM_WORKERS", defaults.max_warm_workers)),
            scale_up_timeout_s=float(
                env.get("REFIT_SCALE_UP_TIMEOUT_S", defaults.scale_up_timeout_s)
            ),
            bucket=env.get("REFIT_BUCKET", defaults.bucket),
            max_image_bytes=int(env.get("REFIT_MAX_IMAGE_BYTES", defaults.max_image_bytes)),
            max_image_pixels=int(env.get("REFIT_MAX_IMAGE_PIXELS", defaults.max_image_pixels)),
            upstream_timeout_s=float(
                env.get("REFIT_UPSTREAM_TIMEOUT_S", defaults.upstream_timeout_s)
            ),
            register_timeout_s=float(
                env.get("REFIT_REGISTER_TIMEOUT_S", defaults.register_timeout_s)
            ),
            reconcile_interval_s=float(
                env.get("REFIT_RECONCILE_INTERVAL_S", defaults.reconcile_interval_s)
            ),
            watch_interval_s=float(env.get("REFIT_WATCH_INTERVAL_S", defaults.watch_interval_s)),
            reconcile_retry_s=float(env.get("REFIT_RECONCILE_RETRY_S", defaults.reconcile_retry_s)),
            reconcile_retry_max_s=float(
                env.get("REFIT_RECONCILE_RETRY_MAX_S", defaults.reconcile_retry_max_s)
            ),
            stream_window=int(env.get("REFIT_STREAM_WINDOW", defaults.stream_window)),
            workers=workers,
            max_streams=int(env.get("REFIT_MAX_STREAMS", 0)) or workers // 2,
            max_connections=int(env.get("REFIT_MAX_CONNECTIONS", defaults.max_connections)),
            max_streams_per_connection=int(
                env.get("REFIT_MAX_STREAMS_PER_CONNECTION", defaults.max_streams_per_connection)
            ),
            request_read_timeout_s=float(
                env.get("REFIT_REQUEST_READ_TIMEOUT_S", defaults.request_read_timeout_s)
            ),
            connection_idle_s=float(env.get("REFIT_CONNECTION_IDLE_S", defaults.connection_idle_s)),
            keepalive_s=float(env.get("REFIT_KEEPALIVE_S", defaults.keepalive_s)),
            min_client_ping_s=float(env.get("REFIT_MIN_CLIENT_PING_S", defaults.min_client_ping_s)),
            trainer_address=env.get("REFIT_TRAINER_ADDRESS", defaults.trainer_address),
            trainer_timeout_s=float(env.get("REFIT_TRAINER_TIMEOUT_S", defaults.trainer_timeout_s)),
            storage=StorageSettings.from_env(env),
            auth=AuthSettings.from_env(env),
            tls=TlsSettings.from_env(env),
        )
