"""The trainer process: ``python -m trainer.server``. Runs retraining jobs one at a time behind an
internal gRPC API (refit.trainer.v1.Trainer) that only the refit service calls.

Threads: unary calls (Submit, GetJob, ...) keep UNARY_WORKERS threads whatever the streams do:
Subscribe streams, one per service replica, are capped at REFIT_TRAINER_MAX_STREAMS beside them
(RESOURCE_EXHAUSTED past it). grpc.health.v1 answers on a server and port of its own
(REFIT_TRAINER_HEALTH_ADDRESS), so probes never wait behind the job API.

On start it resumes jobs a restart interrupted and, when REFIT_PUBLISH_BASE_MODEL is set,
publishes the base model (compose: the trainer container replaces the one-shot init).
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from refit import logs
from refit.errors import ErrorInterceptor
from refit.gc import collect_garbage
from refit.limits import StreamLimitInterceptor
from refit.netutil import bind, wait_for_signal
from refit.publish import Publisher, PublishRetry
from refit.torchserve import Targets, TorchServeClient
from refit.torchserve.keys import key_source
from refit.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from refit.v1 import refit_pb2 as pb
from trainer import metrics
from trainer.jobs.context import JobRunner
from trainer.jobs.manager import JobManager
from trainer.jobs.protos import job_to_proto, request_to_dict, state_names
from trainer.jobs.records import JobRecord, JobStore
from trainer.jobs.runner import TrainingRunner
from trainer.jobs.settings import TrainerSettings

log = logging.getLogger(__name__)
UNARY_WORKERS = 16  # threads beside the streams' (the service is the only client)
HEALTH_WORKERS = 4  # Check is unary; Watch streams may take at most HEALTH_STREAMS of them
HEALTH_STREAMS = 2
SERVICE_NAME = trainer_pb2.DESCRIPTOR.services_by_name["Trainer"].full_name


class TrainerServicer(trainer_pb2_grpc.TrainerServicer):
    """Thin: proto <-> JobManager; errors are mapped by ErrorInterceptor."""

    def __init__(self, jobs: JobManager) -> None:
        self.jobs = jobs

    def Submit(self, request: pb.RetrainRequest, context: grpc.ServicerContext) -> pb.Job:
        return self._job(self.jobs.submit(request_to_dict(request)).id)

    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.Job:
        return self._job(request.id)

    def ListJobs(
        self, request: pb.ListJobsRequest, context: grpc.ServicerContext
    ) -> pb.ListJobsResponse:
        records = self.jobs.list(request.model, state_names(request.states), request.limit or 100)
        return pb.ListJobsResponse(jobs=[self._proto(r) for r in records])

    def CancelJob(self, request: pb.CancelJobRequest, context: grpc.ServicerContext) -> pb.Job:
        return self._proto(self.jobs.cancel(request.id))

    def Subscribe(
        self, request: trainer_pb2.SubscribeRequest, context: grpc.ServicerContext
    ) -> Iterator[trainer_pb2.SubscribeResponse]:
        active, events = self.jobs.subscribe(context.is_active)
        jobs = trainer_pb2.ActiveJobs(jobs=[self._proto(r) for r in active])
        yield trainer_pb2.SubscribeResponse(active=jobs)
        for kind, record in events:
            event = pb.JobEvent(job=self._proto(record), kind=kind)
            yield trainer_pb2.SubscribeResponse(event=event)

    def _job(self, job_id: str) -> pb.Job:
        return self._proto(self.jobs.get(job_id))

    def _proto(self, record: JobRecord) -> pb.Job:
        return job_to_proto(record, self.jobs.queue_position(record.id))


@dataclass
class TrainerServer:
    server: grpc.Server
    port: int
    health_server: grpc.Server
    health_port: int
    streams: StreamLimitInterceptor  # its ``active``: Subscribe streams open now
    jobs: JobManager
    torchserve: TorchServeClient
    health: health.HealthServicer
    settings: TrainerSettings
    stop_event: threading.Event

    def start(self) -> None:
        self.health_server.start()  # NOT_SERVING until the job API is up
        self.jobs.start()
        self.server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.settings.gc_interval_s > 0:
            threading.Thread(target=self._collect_garbage, daemon=True, name="gc").start()

    def _collect_garbage(self) -> None:
        """refit/gc.py every gc_interval_s, the first time one interval after start."""
        store = self.jobs.store.store
        while not self.stop_event.wait(self.settings.gc_interval_s):
            try:
                garbage = collect_garbage(store, self.settings.bucket)
                log.info("garbage collection removed %d objects", len(garbage.all()))
            except Exception:
                log.exception("garbage collection failed; retrying in one interval")

    def stop(self, grace_s: float = 5.0) -> None:
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.stop_event.set()
        self.jobs.stop()
        self.server.stop(grace_s).wait()
        self.health_server.stop(0).wait()
        self.torchserve.close()


def build_server(settings: TrainerSettings, runner: JobRunner | None = None) -> TrainerServer:
    """``runner``: what a job does; the real TrainingRunner unless a test injects one."""
    store = settings.storage.open()
    store.ensure_bucket(settings.bucket)
    torchserve = TorchServeClient(
        settings.torchserve_inference,
        settings.torchserve_management,
        register_timeout_s=settings.register_timeout_s,
        keys=key_source(
            settings.torchserve_keys,
            Targets.parse(settings.torchserve_inference, settings.torchserve_management),
            functools.partial(store.get, settings.bucket),
        ),
    )
    if runner is None:
        retry = PublishRetry(settings.publish_retry_s, wait_s=settings.publish_wait_s)
        publisher = Publisher(store, settings.bucket, torchserve, retry)
        runner = TrainingRunner(settings, store, publisher)
    jobs = JobManager(
        JobStore(store, settings.bucket),
        runner,
        max_attempts=settings.max_attempts,
        max_queued=settings.max_queued,
        history=settings.job_history,
        retry_backoff_s=settings.retry_backoff_s,
    )
    workers = UNARY_WORKERS + settings.max_streams
    streams = StreamLimitInterceptor(settings.max_streams, "REFIT_TRAINER_MAX_STREAMS")
    server = grpc.server(
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="trainer-grpc"),
        interceptors=[streams, ErrorInterceptor()],
        maximum_concurrent_rpcs=workers,  # every call has a thread; one more is refused
    )
    trainer_pb2_grpc.add_TrainerServicer_to_server(TrainerServicer(jobs), server)
    reflection.enable_server_reflection((SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = bind(server, settings.grpc_address)
    health_server, health_servicer = _health_server()
    health_port = bind(health_server, settings.health_address)
    return TrainerServer(
        server,
        port,
        health_server,
        health_port,
        streams,
        jobs,
        torchserve,
        health_servicer,
        settings,
        threading.Event(),
    )


def _health_server() -> tuple[grpc.Server, health.HealthServicer]:
    """grpc.health.v1 alone, on threads of its own (probes: k8s, Docker, the launcher)."""
    server = grpc.server(
        ThreadPoolExecutor(max_workers=HEALTH_WORKERS, thread_name_prefix="trainer-health"),
        interceptors=[StreamLimitInterceptor(HEALTH_STREAMS, "health Watch streams")],
        maximum_concurrent_rpcs=HEALTH_WORKERS,
    )
    servicer = health.HealthServicer()
    for name in ("", SERVICE_NAME):
        servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return server, servicer


def use_forkserver() -> None:
    """DataLoader workers forked from this process (which runs gRPC threads) can die: gRPC is
    not fork-safe. Fork them from a clean server process instead, torch preloaded so each worker
    still starts in milliseconds."""
    multiprocessing.set_forkserver_preload(["torch", "trainer.train"])
    multiprocessing.set_start_method("forkserver", force=True)


def main() -> None:
    logs.configure("trainer")
    metrics.forget_dead_processes()
    settings = TrainerSettings.from_env()
    use_forkserver()
    if settings.publish_base_model:
        from trainer.base_model import publish_base_model

        record = publish_base_model(
            settings.storage.open(), settings.bucket, batching=settings.batching
        )
        log.info("base model: %s v%s", record.model, record.version)
    metrics.serve(settings.metrics_address)
    trainer = build_server(settings)
    trainer.start()
    log.info(
        "trainer on %s (health on %s, metrics on %s)",
        settings.grpc_address,
        settings.health_address,
        settings.metrics_address,
    )
    wait_for_signal()
    trainer.stop()


if __name__ == "__main__":
    main()
