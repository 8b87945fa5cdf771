"""Every Prometheus metric of the service, in one place. Labels are bounded: no request ids."""

from __future__ import annotations

import grpc
from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
SIZE_BUCKETS = tuple(2**i for i in range(10, 25, 2))  # 1 KiB .. 16 MiB

RPC_REQUESTS = Counter(
    "refit_rpc_requests_total",
    "gRPC requests handled, by method and status code",
    ["method", "code"],
)
RPC_LATENCY = Histogram(
    "refit_rpc_latency_seconds", "gRPC handling time", ["method"], buckets=LATENCY_BUCKETS
)
RPC_IN_FLIGHT = Gauge(
    "refit_rpc_in_flight", "gRPC requests being handled now (each holds a thread)", ["method"]
)
RPC_AWAITING_MESSAGE = Gauge(
    "refit_rpc_awaiting_message",
    "Authenticated calls whose request message has not arrived yet (no thread held)",
)
UPSTREAM_LATENCY = Histogram(
    "refit_upstream_latency_seconds",
    "TorchServe call time, by call",
    ["call"],
    buckets=LATENCY_BUCKETS,
)
UPSTREAM_ERRORS = Counter(
    "refit_upstream_errors_total",
    "TorchServe calls that failed, by call and code",
    ["call", "code"],
)
PREDICTIONS = Counter(
    "refit_predictions_total", "Images classified, by model and version", ["model", "version"]
)
PAYLOAD_BYTES = Histogram(
    "refit_request_payload_bytes", "Image bytes per request", ["method"], buckets=SIZE_BUCKETS
)
AUTH_FAILURES = Counter(
    "refit_auth_failures_total",
    "Calls refused by authentication, by method and reason (missing, invalid, forbidden)",
    ["method", "reason"],
)
MODEL_VERSIONS = Gauge("refit_model_versions", "Published versions per model", ["model"])
MODEL_DEFAULT = Gauge(
    "refit_model_default_version_info", "1 for each model's default version", ["model", "version"]
)
REGISTRATION_FAILURES = Counter(
    "refit_registration_failures_total",
    "Attempts to register a published version with TorchServe that failed, by model",
    ["model"],
)
VERSIONS_NOT_SERVED = Gauge(
    "refit_model_versions_not_served",
    "Published versions a TorchServe replica does not hold, by model, state and replica",
    ["model", "state", "replica"],
)
# Per TorchServe replica (its management address). Set from scratch on every reconcile pass, so
# replicas that left (a DNS name resolves to fewer) drop out: as many series as replicas.
REPLICA_UP = Gauge(
    "refit_torchserve_replica_up", "1 while a TorchServe replica answers the service", ["replica"]
)
REPLICA_IN_ROTATION = Gauge(
    "refit_torchserve_replica_in_rotation",
    "1 while a TorchServe replica serves every servable default and gets Predicts",
    ["replica"],
)
WARM_VERSIONS = Gauge(
    "refit_warm_versions",
    "Published versions holding a TorchServe worker now (on some replica), as the service sees it",
)
WORKER_SCALE_UPS = Counter(
    "refit_worker_scale_ups_total",
    "Workers started because a Predict named a version without one, by outcome "
    "(ok, timeout, failed)",
    ["outcome"],
)
WORKER_SCALE_UP_SECONDS = Histogram(
    "refit_worker_scale_up_seconds",
    "Time to start a version's worker on every replica (a cold Predict waits this long)",
    buckets=(0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 60, 120),
)
WORKER_SCALE_DOWNS = Counter(
    "refit_worker_scale_downs_total",
    "Workers stopped, by reason (idle, budget) and outcome (ok, failed)",
    ["reason", "outcome"],
)
# Every outcome exported at 0 from the start: a series born at 1 shows no rate() or increase()
# for its first event, and the dashboard and RefitWorkerStartsFailing read these.
for _outcome in ("ok", "timeout", "failed"):
    WORKER_SCALE_UPS.labels(_outcome)
for _reason in ("idle", "budget"):
    for _outcome in ("ok", "failed"):
        WORKER_SCALE_DOWNS.labels(_reason, _outcome)
WORKER_USAGE_READS = Counter(
    "refit_worker_usage_reads_total",
    "Reads of every TorchServe replica's inference counters by the idle pass, by outcome (ok; "
    "failed: no version was stopped as idle that round)",
    ["outcome"],
)
PREDICT_REFUSALS = Counter(
    "refit_predict_refusals_total",
    "Predicts refused with RESOURCE_EXHAUSTED before a worker ran them, by reason (queue_full: "
    "TorchServe's job queue for the version was full; worker_budget: starting its worker would "
    "have stopped a default or a young candidate)",
    ["reason"],
)
for _outcome in ("ok", "failed"):
    WORKER_USAGE_READS.labels(_outcome)
for _reason in ("queue_full", "worker_budget"):
    PREDICT_REFUSALS.labels(_reason)
MODEL_PROBLEM = Gauge(
    "refit_model_problem",
    "1 while a model cannot be served as published (GetModel says why)",
    ["model"],
)
OBJECT_STORE_UP = Gauge(
    "refit_object_store_up",
    "1 while the object store answers the service's registry reads; 0: serving the registry as "
    "last read (no new versions, promotions or retraining)",
)
SET_DEFAULT_FAILURES = Counter(
    "refit_set_default_failures_total",
    "TorchServe SetDefault calls that failed, by model (retried; Predicts name their version)",
    ["model"],
)


def observe_payload(method: str, image_bytes: int) -> None:
    PAYLOAD_BYTES.labels(method).observe(image_bytes)


def record_call(method: str, code: grpc.StatusCode, seconds: float) -> None:
    """Every RPC, by method and final status code, and its time (auth refusals included)."""
    RPC_LATENCY.labels(method).observe(seconds)
    RPC_REQUESTS.labels(method, code.name).inc()


def observe_models(versions: dict[str, int], defaults: dict[str, str]) -> None:
    """Publishes the registry's shape: versions per model and each default version."""
    MODEL_VERSIONS.clear()
    MODEL_DEFAULT.clear()
    for model, count in versions.items():
        MODEL_VERSIONS.labels(model).set(count)
    for model, version in defaults.items():
        MODEL_DEFAULT.labels(model, version).set(1)


def observe_upstream(call: str, seconds: float, error_code: str | None) -> None:
    """TorchServeClient's observer: upstream latency and failures."""
    UPSTREAM_LATENCY.labels(call).observe(seconds)
    if error_code is not None:
        UPSTREAM_ERRORS.labels(call, error_code).inc()


def observe_registrations(
    states: dict[tuple[str, str, str], str], problems: dict[str, str]
) -> None:
    """The reconciler's view: versions each replica lacks (pending or failed), models in trouble."""
    VERSIONS_NOT_SERVED.clear()
    MODEL_PROBLEM.clear()
    for (model, _, replica), state in states.items():
        VERSIONS_NOT_SERVED.labels(model, "pending", replica).inc(0)
        VERSIONS_NOT_SERVED.labels(model, "failed", replica).inc(0)
        if state != "registered":
            VERSIONS_NOT_SERVED.labels(model, state, replica).inc()
    for model in problems:
        MODEL_PROBLEM.labels(model).set(1)


def observe_replicas(reachable: dict[str, bool], rotation: set[str]) -> None:
    """Which TorchServe replicas answer, and which get Predicts."""
    REPLICA_UP.clear()
    REPLICA_IN_ROTATION.clear()
    for replica, up in reachable.items():
        REPLICA_UP.labels(replica).set(int(up))
        REPLICA_IN_ROTATION.labels(replica).set(int(replica in rotation))
