"""A real TorchServe, the base model published to a real S3 server, and the service in front."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import grpc
import pytest

from refit import netutil
from refit.storage import S3Store
from refit.torchserve_process import TorchServePorts, TorchServeProcess, allowed_urls_for
from refit.v1 import refit_pb2_grpc
from service.config import ServiceSettings
from service.server import RefitServer, build_server
from tests.conftest import MotoServer, free_port
from trainer.base_model import publish_base_model


@pytest.fixture(scope="session")
def refit_bucket(moto_server: MotoServer) -> str:
    """A bucket holding the published base model (``imagenet`` v1)."""
    name = f"refit-{uuid.uuid4().hex[:8]}"
    publish_base_model(S3Store(moto_server.settings), name)
    return name


@pytest.fixture(scope="session")
def torchserve(
    tmp_path_factory: pytest.TempPathFactory, moto_server: MotoServer
) -> Iterator[TorchServeProcess]:
    ports = TorchServePorts(*(free_port() for _ in range(5)))
    process = TorchServeProcess(
        tmp_path_factory.mktemp("torchserve"),
        ports,
        allowed_urls_for(moto_server.settings.endpoint),
    )
    process.start()
    yield process
    process.stop()


def service_settings(
    moto_server: MotoServer, bucket: str, ports: TorchServePorts, **overrides: object
) -> ServiceSettings:
    fields = {
        "grpc_address": "127.0.0.1:0",
        "torchserve_inference": f"127.0.0.1:{ports.grpc_inference}",
        "torchserve_management": f"127.0.0.1:{ports.grpc_management}",
        "bucket": bucket,
        "reconcile_interval_s": 2.0,
        "storage": moto_server.settings,
    }
    return ServiceSettings(**{**fields, **overrides})


def start_service(settings: ServiceSettings, wait_ready: bool = True) -> RefitServer:
    refit = build_server(settings)
    refit.start(settings.reconcile_interval_s)
    if wait_ready:
        wait_serving(refit.port)
    return refit


def wait_serving(port: int, timeout_s: float = 120.0) -> None:
    netutil.wait_serving(f"127.0.0.1:{port}", timeout_s)


@pytest.fixture(scope="session")
def refit_service(
    moto_server: MotoServer, refit_bucket: str, torchserve: TorchServeProcess
) -> Iterator[RefitServer]:
    refit = start_service(service_settings(moto_server, refit_bucket, torchserve.ports))
    yield refit
    refit.stop()


def connect(port: int) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{port}")


@pytest.fixture(scope="session")
def channel(refit_service: RefitServer) -> Iterator[grpc.Channel]:
    with connect(refit_service.port) as channel:
        yield channel


@pytest.fixture(scope="session")
def stub(channel: grpc.Channel) -> refit_pb2_grpc.RefitStub:
    return refit_pb2_grpc.RefitStub(channel)
