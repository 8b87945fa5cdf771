"""Typed, frozen trainer-process configuration, read once from the environment at start-up."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from refit import shared_settings as shared
from refit.registry import DEFAULT_BATCH_SIZE, DEFAULT_MAX_BATCH_DELAY_MS, Batching
from refit.settings import field_for, from_env, nested, parse_optional_int, setting
from refit.storage import StorageSettings
from refit.torchserve.keys import key_source
from refit.torchserve.targets import Targets


@dataclass(frozen=True)
class TrainerSettings:
    """The trainer's configuration (``python -m trainer.server``)."""

    grpc_address: str = setting(
        "REFIT_TRAINER_GRPC_ADDRESS", "127.0.0.1:50052", "host:port the trainer's API listens on"
    )
    # grpc.health.v1 on a server and threads of its own: nothing the job API does can starve it.
    health_address: str = field_for(shared.TRAINER_HEALTH_ADDRESS)
    # Unary calls have threads of their own beside the streams (trainer/server.py).
    max_streams: int = setting(
        "REFIT_TRAINER_MAX_STREAMS",
        8,
        "Subscribe streams at once (each service replica holds one); more: RESOURCE_EXHAUSTED",
    )
    metrics_address: str = field_for(shared.TRAINER_METRICS_ADDRESS)
    torchserve_inference: str = field_for(shared.TORCHSERVE_INFERENCE)
    torchserve_management: str = field_for(shared.TORCHSERVE_MANAGEMENT)
    torchserve_keys: str = field_for(shared.TORCHSERVE_KEYS)
    bucket: str = field_for(shared.BUCKET)
    gate_margin: float = setting(
        "REFIT_GATE_MARGIN",
        0.0,
        "a candidate is published only with val_accuracy >= the default's + this",
    )
    int8_max_drop: float = setting(
        "REFIT_INT8_MAX_DROP_POINTS",
        0.3,
        "accuracy points an int8 model may lose against fp32 and still be served",
    )
    device: str = setting("REFIT_TRAINER_DEVICE", "auto", "auto, cpu or cuda")
    loader_workers: int | None = setting(
        "REFIT_TRAINER_LOADER_WORKERS",
        None,
        "DataLoader processes per job; auto: chosen by the host",
        parse=parse_optional_int,
        shown="auto",
    )
    processes_per_job: int = setting(
        "REFIT_TRAINER_PROCESSES_PER_JOB",
        1,
        "more than 1: each job trains as that many torchrun processes (DDP)",
    )
    weights_uri: str = setting(
        "REFIT_WEIGHTS_URI", "s3://models/backbones/", "where the backbone's pretrained weights are"
    )
    max_attempts: int = setting(
        "REFIT_TRAINER_MAX_ATTEMPTS",
        3,
        "runs a job gets (trainer restarts, store outages) before it fails",
    )
    retry_backoff_s: float = setting(
        "REFIT_TRAINER_RETRY_BACKOFF_S",
        10.0,
        "first wait, in seconds, before a job hit by a store outage runs again",
    )
    max_queued: int = setting(
        "REFIT_TRAINER_MAX_QUEUED", 100, "jobs waiting at most; more: RESOURCE_EXHAUSTED"
    )
    job_history: int = setting(
        "REFIT_TRAINER_JOB_HISTORY", 1000, "ended jobs kept in memory (all stay in the store)"
    )
    log_every: int = setting(
        "REFIT_TRAINER_LOG_EVERY", 5, "training batches between progress events"
    )
    register_timeout_s: float = field_for(shared.REGISTER_TIMEOUT_S)
    publish_retry_s: float = setting(
        "REFIT_PUBLISH_RETRY_S",
        2.0,
        "first wait, in seconds, while TorchServe is unreachable at publish time",
    )
    publish_wait_s: float = setting(
        "REFIT_PUBLISH_WAIT_S",
        3600.0,
        "seconds of such waits before the job fails (its version stays recorded)",
    )
    checkpoint_interval_s: float = setting(
        "REFIT_TRAINER_CHECKPOINT_INTERVAL_S",
        600.0,
        "a long epoch also checkpoints this often, in seconds; 0: at epoch ends only",
    )
    gc_interval_s: float = setting(
        "REFIT_GC_INTERVAL_S",
        3600.0,
        "seconds between garbage collections of the object store (refit/gc.py); 0: off",
    )
    publish_base_model: bool = setting(
        "REFIT_PUBLISH_BASE_MODEL", False, "publish the ImageNet model as imagenet v1 at start"
    )
    # How TorchServe batches new versions' Predicts, unless a job asks otherwise (``batching``).
    batch_size: int = setting(
        "REFIT_BATCH_SIZE", DEFAULT_BATCH_SIZE, "most Predicts TorchServe batches into one pass"
    )
    max_batch_delay_ms: int = setting(
        "REFIT_MAX_BATCH_DELAY_MS",
        DEFAULT_MAX_BATCH_DELAY_MS,
        "longest wait, in ms, for a batch to fill",
    )
    storage: StorageSettings = nested(StorageSettings)

    def __post_init__(self) -> None:
        targets = Targets.parse(self.torchserve_inference, self.torchserve_management)
        key_source(self.torchserve_keys, targets, lambda key: b"")  # ValueError: bad keys
        try:
            self.batching  # noqa: B018 (built to be checked)
        except ValueError as exc:
            raise ValueError(f"REFIT_BATCH_SIZE or REFIT_MAX_BATCH_DELAY_MS: {exc}") from exc
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

    @property
    def batching(self) -> Batching:
        return Batching(self.batch_size, self.max_batch_delay_ms)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TrainerSettings:
        return from_env(cls, env)
