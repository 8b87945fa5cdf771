"""Settings that more than one process reads, declared once here; each process's settings class
holds them as fields (``refit.settings.field_for``)."""

from __future__ import annotations

from refit.settings import declare

BUCKET = declare("REFIT_BUCKET", "refit", "the object-store bucket of models, jobs and datasets")
TORCHSERVE_INFERENCE = declare(
    "REFIT_TORCHSERVE_INFERENCE",
    "127.0.0.1:7070",
    "TorchServe's gRPC inference API, host:port; comma-separated, one per replica",
)
TORCHSERVE_MANAGEMENT = declare(
    "REFIT_TORCHSERVE_MANAGEMENT",
    "127.0.0.1:7071",
    "TorchServe's gRPC management API, one per replica in the same order",
)
TORCHSERVE_KEYS = declare(
    "REFIT_TORCHSERVE_KEYS",
    "",
    "where each TorchServe replica's API keys are: store, file:PATH,... or empty (only for a "
    "TorchServe with token authorization off)",
)
REGISTER_TIMEOUT_S = declare(
    "REFIT_REGISTER_TIMEOUT_S",
    180.0,
    "seconds to register a model version with TorchServe (it starts a worker)",
)
GRPC_ADDRESS = declare("REFIT_GRPC_ADDRESS", "127.0.0.1:50051", "the service's public gRPC API")
HEALTH_ADDRESS = declare(
    "REFIT_HEALTH_ADDRESS",
    "127.0.0.1:50054",
    "the service's grpc.health.v1 alone, on a server and thread of its own, for probes",
)
METRICS_ADDRESS = declare(
    "REFIT_METRICS_ADDRESS", "127.0.0.1:9101", "the service's Prometheus /metrics endpoint"
)
TRAINER_ADDRESS = declare(
    "REFIT_TRAINER_ADDRESS", "127.0.0.1:50052", "where the service reaches the trainer's API"
)
TRAINER_HEALTH_ADDRESS = declare(
    "REFIT_TRAINER_HEALTH_ADDRESS",
    "127.0.0.1:50053",
    "the trainer's grpc.health.v1, on a server and threads of its own",
)
TRAINER_METRICS_ADDRESS = declare(
    "REFIT_TRAINER_METRICS_ADDRESS", "127.0.0.1:9102", "the trainer's Prometheus /metrics endpoint"
)
SERVICE_ADDRESS = declare("REFIT_ADDRESS", "127.0.0.1:50051", "the refit service the CLI calls")
