"""Typed, frozen service configuration, read once from the environment at start-up."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from refit.storage import StorageSettings

MiB = 1 << 20


@dataclass(frozen=True)
class ServiceSettings:
    grpc_address: str = "127.0.0.1:50051"
    metrics_address: str = "127.0.0.1:9101"
    torchserve_inference: str = "127.0.0.1:7070"
    torchserve_management: str = "127.0.0.1:7071"
    bucket: str = "refit"
    max_image_bytes: int = 8 * MiB
    max_image_pixels: int = 40_000_000  # more decoded pixels than this: a decompression bomb
    upstream_timeout_s: float = 30.0  # per TorchServe inference call, capped by the client deadline
    register_timeout_s: float = 180.0  # registering a model starts a worker: seconds, not ms
    reconcile_interval_s: float = 30.0
    reconcile_retry_s: float = 2.0  # first wait before retrying a version TorchServe refused
    reconcile_retry_max_s: float = 300.0  # the backoff doubles up to this
    stream_window: int = 8  # PredictStream images in flight at once per call
    workers: int = 32  # gRPC server threads
    trainer_address: str = "127.0.0.1:50052"  # the trainer's internal API
    trainer_timeout_s: float = 10.0  # per unary call to the trainer
    storage: StorageSettings = field(default_factory=StorageSettings)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> ServiceSettings:
        env = dict(os.environ if env is None else env)
        defaults = cls()
        return cls(
            grpc_address=env.get("REFIT_GRPC_ADDRESS", defaults.grpc_address),
            metrics_address=env.get("REFIT_METRICS_ADDRESS", defaults.metrics_address),
            torchserve_inference=env.get(
                "REFIT_TORCHSERVE_INFERENCE", defaults.torchserve_inference
            ),
            torchserve_management=env.get(
                "REFIT_TORCHSERVE_MANAGEMENT", defaults.torchserve_management
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
            reconcile_retry_s=float(env.get("REFIT_RECONCILE_RETRY_S", defaults.reconcile_retry_s)),
            reconcile_retry_max_s=float(
                env.get("REFIT_RECONCILE_RETRY_MAX_S", defaults.reconcile_retry_max_s)
            ),
            stream_window=int(env.get("REFIT_STREAM_WINDOW", defaults.stream_window)),
            workers=int(env.get("REFIT_GRPC_WORKERS", defaults.workers)),
            trainer_address=env.get("REFIT_TRAINER_ADDRESS", defaults.trainer_address),
            trainer_timeout_s=float(env.get("REFIT_TRAINER_TIMEOUT_S", defaults.trainer_timeout_s)),
            storage=StorageSettings.from_env(env),
        )
