"""Typed, frozen trainer-process configuration, read once from the environment at start-up."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from refit.registry import Batching
from refit.storage import StorageSettings
from refit.torchserve.keys import key_source
from refit.torchserve.targets import Targets


@dataclass(frozen=True)
class TrainerSettings:
    grpc_address: str = "127.0.0.1:50052"
    # grpc.health.v1 on a server and threads of its own: nothing the job API does can starve it.
    health_address: str = "127.0.0.1:50053"
    # Subscribe streams at once (each service replica holds one); more: RESOURCE_EXHAUSTED.
    # Unary calls have threads of their own beside them (trainer/server.py).
    max_streams: int = 8
    metrics_address: str = "127.0.0.1:9102"
    torchserve_inference: str = "127.0.0.1:7070"
    torchserve_management: str = "127.0.0.1:7071"
    # Where each TorchServe replica's keys are (refit/torchserve/keys.py), as for the service
    torchserve_keys: str = ""
    bucket: str = "refit"
    gate_margin: float = 0.0  # a candidate needs val_accuracy >= default's + this
    int8_max_drop: float = 0.3  # accuracy points int8 may lose and still be served
    device: str = "auto"
    loader_workers: int | None = None  # DataLoader processes per job; None: by host
    processes_per_job: int = 1  # > 1: each job trains as that many torchrun processes (DDP)
    weights_uri: str = "s3://models/backbones/"
    max_attempts: int = 3  # runs a job gets (trainer restarts, store outages) before it fails
    retry_backoff_s: float = 10.0  # first wait before a job hit by a store outage runs again
    max_queued: int = 100  # more waiting jobs: RESOURCE_EXHAUSTED
    job_history: int = 1000  # ended jobs kept in memory (all stay in the store)
    log_every: int = 5  # batches between progress events
    register_timeout_s: float = 180.0
    publish_retry_s: float = 2.0  # first wait while TorchServe is unreachable at publish time
    publish_wait_s: float = 3600.0  # then the job fails; its version stays recorded
    checkpoint_interval_s: float = 600.0  # a long epoch also checkpoints this often; 0: never
    gc_interval_s: float = 3600.0  # garbage collection of the object store (refit/gc.py); 0: off
    publish_base_model: bool = False  # publish imagenet v1 at start (compose)
    batching: Batching = field(default_factory=Batching)  # of new versions, unless asked
    storage: StorageSettings = field(default_factory=StorageSettings)

    def __post_init__(self) -> None:
        targets = Targets.parse(self.torchserve_inference, self.torchserve_management)
        key_source(self.torchserve_keys, targets, lambda key: b"")  # ValueError: bad keys
        if self.processes_per_job < 1:
            raise ValueError(
                f"REFIT_TRAINER_PROCESSES_PER_JOB must be 1 or more, got {self.processes_per_job}"
            )
        if self.max_streams < 1:
            raise ValueError(
                f"REFIT_TRAINER_MAX_STREAMS must be 1 or more (one per service replica), got "
                f"{self.max_streams}"
            )
        if self.int8_max_drop < 0:
            raise ValueError(
                f"REFIT_INT8_MAX_DROP_POINTS must be 0 or more points, got {self.int8_max_drop}"
            )
        if self.checkpoint_interval_s < 0:
            raise ValueError(
                "REFIT_TRAINER_CHECKPOINT_INTERVAL_S must be 0 (epoch ends only) or more seconds, "
                f"got {self.checkpoint_interval_s}"
            )

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> TrainerSettings:
        env = dict(os.environ if env is None else env)
        d = cls()
        return cls(
            grpc_address=env.get("REFIT_TRAINER_GRPC_ADDRESS", d.grpc_address),
            health_address=env.get("REFIT_TRAINER_HEALTH_ADDRESS", d.health_address),
            max_streams=int(env.get("REFIT_TRAINER_MAX_STREAMS", d.max_streams)),
            metrics_address=env.get("REFIT_TRAINER_METRICS_ADDRESS", d.metrics_address),
            torchserve_inference=env.get("REFIT_TORCHSERVE_INFERENCE", d.torchserve_inference),
            torchserve_management=env.get("REFIT_TORCHSERVE_MANAGEMENT", d.torchserve_management),
            torchserve_keys=env.get("REFIT_TORCHSERVE_KEYS", d.torchserve_keys),
            bucket=env.get("REFIT_BUCKET", d.bucket),
            gate_margin=float(env.get("REFIT_GATE_MARGIN", d.gate_margin)),
            int8_max_drop=float(env.get("REFIT_INT8_MAX_DROP_POINTS", d.int8_max_drop)),
            device=env.get("REFIT_TRAINER_DEVICE", d.device),
            loader_workers=_optional_int(env.get("REFIT_TRAINER_LOADER_WORKERS", "auto")),
            processes_per_job=int(env.get("REFIT_TRAINER_PROCESSES_PER_JOB", d.processes_per_job)),
            weights_uri=env.get("REFIT_WEIGHTS_URI", d.weights_uri),
            max_attempts=int(env.get("REFIT_TRAINER_MAX_ATTEMPTS", d.max_attempts)),
            retry_backoff_s=float(env.get("REFIT_TRAINER_RETRY_BACKOFF_S", d.retry_backoff_s)),
            max_queued=int(env.get("REFIT_TRAINER_MAX_QUEUED", d.max_queued)),
            job_history=int(env.get("REFIT_TRAINER_JOB_HISTORY", d.job_history)),
            log_every=int(env.get("REFIT_TRAINER_LOG_EVERY", d.log_every)),
            register_timeout_s=float(env.get("REFIT_REGISTER_TIMEOUT_S", d.register_timeout_s)),
            publish_retry_s=float(env.get("REFIT_PUBLISH_RETRY_S", d.publish_retry_s)),
            publish_wait_s=float(env.get("REFIT_PUBLISH_WAIT_S", d.publish_wait_s)),
            checkpoint_interval_s=float(
                env.get("REFIT_TRAINER_CHECKPOINT_INTERVAL_S", d.checkpoint_interval_s)
            ),
            gc_interval_s=float(env.get("REFIT_GC_INTERVAL_S", d.gc_interval_s)),
            publish_base_model=env.get("REFIT_PUBLISH_BASE_MODEL", "false").lower()
            in ("1", "true", "yes"),
            batching=Batching(
                int(env.get("REFIT_BATCH_SIZE", d.batching.batch_size)),
                int(env.get("REFIT_MAX_BATCH_DELAY_MS", d.batching.max_batch_delay_ms)),
            ),
            storage=StorageSettings.from_env(env),
        )


def _optional_int(value: str) -> int | None:
    return None if value.strip().lower() in ("", "auto") else int(value)
