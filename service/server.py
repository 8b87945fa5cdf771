"""Builds and runs the refit gRPC server: ``python -m service.server``.

The API is grpc's asyncio server on an event loop of its own, behind one interceptor (the front
door, service/frontdoor.py); the synchronous servicer runs on REFIT_GRPC_WORKERS threads. Health
is also served alone on REFIT_HEALTH_ADDRESS, by another asyncio server on another thread."""

from __future__ import annotations

import functools
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from refit import logs
from refit.inference_api import grpc_predict_v2_pb2_grpc as oip_grpc
from refit.netutil import wait_for_signal
from refit.publish import Publisher
from refit.registry import Registry
from refit.retry import Backoff
from refit.storage import StoreUnreachable
from refit.torchserve import Targets, TorchServeClient
from refit.torchserve.keys import key_source
from refit.v1 import refit_pb2, refit_pb2_grpc
from service.aio_servers import LoopServer, connection_options
from service.auth import Authenticator
from service.catalog import ModelCatalog
from service.config import ServiceSettings
from service.frontdoor import FrontDoor
from service.inference_protocol import SERVICE_NAME as OIP_SERVICE_NAME
from service.inference_protocol import InferenceProtocolServicer
from service.job_events import JobHub
from service.jobs import Jobs
from service.metrics import observe_upstream
from service.predictions import Predictor
from service.reconciler import Reconciler
from service.servicer import RefitServicer
from service.trainer_client import TrainerClient
from service.watch import Watch
from service.workers import WorkerPolicy, Workers

log = logging.getLogger(__name__)
SERVICE_NAME = refit_pb2.DESCRIPTOR.services_by_name["Refit"].full_name
MESSAGE_OVERHEAD = 64 << 10  # room for the fields around the image


@dataclass
class RefitServer:
    api: LoopServer
    probes: LoopServer  # health alone, on REFIT_HEALTH_ADDRESS
    pool: ThreadPoolExecutor  # the servicer's threads
    reconciler: Reconciler
    torchserve: TorchServeClient
    stop_event: threading.Event
    trainer: TrainerClient
    hub: JobHub  # the one trainer subscription, shared by WatchJob callers
    workers: Workers

    @property
    def port(self) -> int:
        return self.api.port

    @property
    def health_port(self) -> int:
        return self.probes.port

    def start(self, reconcile_interval_s: float, watch_interval_s: float = 1.0) -> None:
        self.probes.start()
        self.api.start()
        threading.Thread(target=self._watch_health, daemon=True, name="health").start()
        threading.Thread(
            target=self.reconciler.run_forever,
            args=(reconcile_interval_s, self.stop_event),
            daemon=True,
            name="reconciler",
        ).start()
        threading.Thread(
            target=Watch(self.reconciler).run_forever,
            args=(watch_interval_s, self.stop_event),
            daemon=True,
            name="watch",
        ).start()
        threading.Thread(target=self.hub.run_forever, daemon=True, name="jobs").start()
        threading.Thread(
            target=self.workers.run_forever, args=(self.stop_event,), daemon=True, name="workers"
        ).start()

    def stop(self, grace_s: float = 5.0) -> None:
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.stop_event.set()
        self.reconciler.wake()
        self.hub.close()
        self.api.stop(grace_s)
        self.probes.stop(0)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.workers.close()
        self.torchserve.close()
        self.trainer.close()

    def _watch_health(self) -> None:
        """SERVING while this replica can answer for the defaults it has cached: the rule is
        in service/rotation.py."""
        while not self.stop_event.is_set():
            ready = self.reconciler.healthy.is_set()
            status = health_pb2.HealthCheckResponse
            self._set_health(status.SERVING if ready else status.NOT_SERVING)
            self.stop_event.wait(0.2)

    def _set_health(self, status: int) -> None:
        for server in (self.api, self.probes):
            server.set_health(("", SERVICE_NAME), status)


def build_server(settings: ServiceSettings) -> RefitServer:
    store = settings.storage.open()
    try:
        store.ensure_bucket(settings.bucket)
    except StoreUnreachable as exc:  # start anyway: not ready until the registry can be read
        log.warning("cannot check bucket %s: %s", settings.bucket, exc.message)
    catalog = ModelCatalog(Registry(store, settings.bucket))
    reconcilers: list[Reconciler] = []

    def observe(call: str, seconds: float, error: str | None) -> None:
        observe_upstream(call, seconds, error)
        if call == "predict" and error in ("UNAVAILABLE", "NOT_FOUND", "INTERNAL") and reconcilers:
            reconcilers[0].wake()  # TorchServe restarted or lost a version: reconcile now

    torchserve = TorchServeClient(
        settings.torchserve_inference,
        settings.torchserve_management,
        timeout_s=settings.upstream_timeout_s,
        register_timeout_s=settings.register_timeout_s,
        observe=observe,
        management_rest=settings.torchserve_management_rest,
        metrics=settings.torchserve_metrics,
        keys=key_source(
            settings.torchserve_keys,
            Targets.parse(settings.torchserve_inference, settings.torchserve_management),
            functools.partial(store.get, settings.bucket),
        ),
    )
    policy = WorkerPolicy(
        settings.idle_worker_s,
        settings.candidate_warm_s,
        settings.max_warm_workers,
        settings.scale_up_timeout_s,
    )
    workers = Workers(torchserve, policy)
    retry = Backoff(settings.reconcile_retry_s, settings.reconcile_retry_max_s)
    reconcilers.append(
        Reconciler(catalog, store, settings.bucket, torchserve, retry, workers=workers)
    )
    reconciler = reconcilers[0]
    predictor = Predictor(settings, catalog, torchserve, workers)
    trainer = TrainerClient(settings.trainer_address, timeout_s=settings.trainer_timeout_s)
    hub = JobHub(trainer, on_success=catalog.refresh)  # the trainer may have promoted
    jobs = Jobs(trainer, catalog, Publisher(store, settings.bucket, torchserve), hub)
    servicer = RefitServicer(predictor, catalog, settings.stream_window, jobs, reconciler)

    def add_services(server: grpc.aio.Server) -> None:
        refit_pb2_grpc.add_RefitServicer_to_server(servicer, server)
        oip_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceProtocolServicer(predictor, catalog), server
        )
        names = (SERVICE_NAME, OIP_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)

    pool = ThreadPoolExecutor(settings.workers, thread_name_prefix="refit")
    options = connection_options(settings)
    probes = LoopServer("health-server", settings.health_address, options)
    try:
        api = LoopServer(
            "grpc-server",
            settings.grpc_address,
            [
                *options,
                ("grpc.max_receive_message_length", settings.max_image_bytes + MESSAGE_OVERHEAD),
            ],
            interceptors=[_front_door(settings, pool)],
            add_services=add_services,
            credentials=settings.tls.server_credentials() if settings.tls.enabled else None,
        )
    except BaseException:
        probes.stop(0)
        raise
    return RefitServer(
        api, probes, pool, reconciler, torchserve, threading.Event(), trainer, hub, workers
    )


def _front_door(settings: ServiceSettings, pool: ThreadPoolExecutor) -> FrontDoor:
    authenticator = None
    if settings.auth.enabled:
        authenticator = Authenticator(settings.auth.checked())
    else:
        log.warning("REFIT_INSECURE_NO_AUTH is set: every RPC is open to anyone who connects")
    return FrontDoor(
        authenticator,
        pool,
        max_calls=settings.workers,
        max_streams=settings.max_streams,
        read_timeout_s=settings.request_read_timeout_s,
    )


def main() -> None:
    logs.configure("service")
    settings = ServiceSettings.from_env()
    host, _, port = settings.metrics_address.rpartition(":")
    start_http_server(int(port), addr=host)
    refit = build_server(settings)
    refit.start(settings.reconcile_interval_s, settings.watch_interval_s)
    log.info(
        "refit service on %s (%s; health on %s, metrics on %s)",
        settings.grpc_address,
        "TLS" if settings.tls.enabled else "plaintext",
        settings.health_address,
        settings.metrics_address,
    )
    wait_for_signal()
    refit.stop()


if __name__ == "__main__":
    main()
