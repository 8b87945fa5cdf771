"""A real TorchServe, the base model published to a real S3 server, and the service in front."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import secrets
import socket
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cli.client import ClientSettings
from cli.client import connect as client_connect
from local_stack.torchserve import TorchServePorts, TorchServeProcess, allowed_urls_for
from refit import netutil
from refit.registry import Registry, VersionRecord
from refit.storage import FileStore, S3Store, StorageSettings
from refit.v1 import refit_pb2_grpc
from service.auth import AuthSettings
from service.config import ServiceSettings
from service.server import RefitServer, build_server
from tests.conftest import MotoServer, free_port
from tests.faults import S3FaultProxy
from trainer.base_model import publish_base_model

ADMIN_TOKEN = f"admin-{secrets.token_urlsafe(24)}"  # the tests' tokens: new every session
PREDICT_TOKEN = f"predict-{secrets.token_urlsafe(24)}"
TEST_AUTH = AuthSettings(admin_tokens=(ADMIN_TOKEN,), predict_tokens=(PREDICT_TOKEN,))


@pytest.fixture(scope="session")
def refit_bucket(moto_server: MotoServer) -> str:
    """A bucket holding the base model (``imagenet`` v1), published as the compose stack's
    base-model job publishes it: with the trainer's identity."""
    name = f"refit-{uuid.uuid4().hex[:8]}"
    publish_base_model(S3Store(moto_server.identity("trainer", name)), name)
    return name


@pytest.fixture(scope="session")
def s3_proxy(moto_server: MotoServer) -> Iterator[S3FaultProxy]:
    """The session's S3 server behind a proxy that tests can cut or make refuse writes."""
    proxy = S3FaultProxy(moto_server.settings)
    proxy.start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="session")
def torchserve(
    tmp_path_factory: pytest.TempPathFactory, moto_server: MotoServer, s3_proxy: S3FaultProxy
) -> Iterator[TorchServeProcess]:
    with torchserve_process(tmp_path_factory, "torchserve", moto_server, s3_proxy) as process:
        yield process


@contextlib.contextmanager
def torchserve_process(
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    moto_server: MotoServer,
    s3_proxy: S3FaultProxy,
) -> Iterator[TorchServeProcess]:
    """A TorchServe of a test's own on free ports, allowed to load from the S3 server and proxy."""
    ports = TorchServePorts(*(free_port() for _ in range(5)))
    process = TorchServeProcess(
        tmp_path_factory.mktemp(name),
        ports,
        allowed_urls_for(moto_server.settings.endpoint, s3_proxy.settings.endpoint),
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()


def bucket_with_imagenet_archive(
    moto_server: MotoServer, refit_bucket: str, prefix: str
) -> tuple[S3Store, str, VersionRecord]:
    """A new bucket holding a copy of imagenet v1's archive: (store, bucket, v1's record)."""
    store = S3Store(moto_server.settings)
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    store.ensure_bucket(name)
    source = Registry(store, refit_bucket).get("imagenet", "1")
    store.put(name, source.archive_key, store.get(refit_bucket, source.archive_key))
    return store, name, source


def archive_as_version(archive: bytes, version: str) -> bytes:
    """The same .mar, its manifest naming ``version`` (TorchServe takes a version from there)."""
    source, target = io.BytesIO(archive), io.BytesIO()
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for item in old.infolist():
            data = old.read(item)
            if item.filename == "MAR-INF/MANIFEST.json":
                manifest = json.loads(data)
                manifest["model"]["modelVersion"] = version
                data = json.dumps(manifest).encode()
            new.writestr(item, data)
    return target.getvalue()


def add_version_of(
    store: S3Store, bucket: str, source: VersionRecord, model: str, version: str
) -> VersionRecord:
    """``model`` ``version``: ``source``'s archive repackaged as that version, recorded."""
    archive = archive_as_version(store.get(bucket, source.archive_key), version)
    key = Registry.archive_key(model, hashlib.sha256(archive).hexdigest())
    store.put(bucket, key, archive)
    record = VersionRecord(model, version, key, source.class_names)
    Registry(store, bucket).add(record)
    return record


def service_settings(
    moto_server: MotoServer,
    bucket: str,
    torchserve: TorchServeProcess | TorchServePorts,
    **overrides: object,
) -> ServiceSettings:
    """The service on ``bucket`` with its own least-privilege identity, as in production, and
    ``torchserve``'s keys (none when only its ports are given: nothing answers there)."""
    ports = torchserve if isinstance(torchserve, TorchServePorts) else torchserve.ports
    keys = "" if isinstance(torchserve, TorchServePorts) else torchserve.keys
    fields = {
        "grpc_address": "127.0.0.1:0",
        "health_address": "127.0.0.1:0",
        "torchserve_inference": f"127.0.0.1:{ports.grpc_inference}",
        "torchserve_management": f"127.0.0.1:{ports.grpc_management}",
        "torchserve_management_rest": f"127.0.0.1:{ports.management}",
        "torchserve_metrics": f"127.0.0.1:{ports.metrics}",
        "torchserve_keys": keys,
        "bucket": bucket,
        "reconcile_interval_s": 2.0,
        "storage": moto_server.identity("service", bucket),
        "auth": TEST_AUTH,
    }
    return ServiceSettings(**{**fields, **overrides})


def offline_settings(data_dir: Path, **overrides: object) -> ServiceSettings:
    """The service on the embedded store, with no TorchServe and no trainer behind it: for what
    the front door decides on its own (identifiers, auth, TLS, limits)."""
    nowhere = f"127.0.0.1:{free_port()}"
    fields = {
        "grpc_address": "127.0.0.1:0",
        "health_address": "127.0.0.1:0",
        "torchserve_inference": nowhere,
        "torchserve_management": nowhere,
        "trainer_address": nowhere,
        "reconcile_interval_s": 3600.0,
        "storage": StorageSettings(data_dir=data_dir),
        "auth": TEST_AUTH,
    }
    return ServiceSettings(**{**fields, **overrides})


def publish_records(data_dir: Path, versions: dict[str, list[str]]) -> FileStore:
    """Version records (default: the first) in the embedded store under ``data_dir``; their
    archives do not exist: for tests that never reach TorchServe."""
    store = FileStore(data_dir / "objects")
    store.ensure_bucket("refit")
    registry = Registry(store, "refit")
    for model, numbers in versions.items():
        for version in numbers:
            registry.add(VersionRecord(model, version, f"archives/{model}/x.mar", ["a", "b"]))
        registry.set_default(model, numbers[0])
    return store


@pytest.fixture
def silent_torchserve() -> Iterator[str]:
    """Accepts connections and never answers: every Predict waits for its upstream timeout."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def start_service(settings: ServiceSettings, wait_ready: bool = True) -> RefitServer:
    refit = build_server(settings)
    refit.start(settings.reconcile_interval_s, settings.watch_interval_s)
    if wait_ready:
        wait_serving(refit.port)
    return refit


def wait_serving(port: int, timeout_s: float = 120.0) -> None:
    netutil.wait_serving(f"127.0.0.1:{port}", timeout_s)


@pytest.fixture(scope="session")
def refit_service(
    moto_server: MotoServer, refit_bucket: str, torchserve: TorchServeProcess
) -> Iterator[RefitServer]:
    refit = start_service(service_settings(moto_server, refit_bucket, torchserve))
    yield refit
    refit.stop()


def connect(port: int, token: str = ADMIN_TOKEN) -> grpc.Channel:
    """A channel to the service on ``port`` that sends ``token`` (admin unless told)."""
    return client_connect(ClientSettings(f"127.0.0.1:{port}", token=token))


@pytest.fixture(scope="session")
def channel(refit_service: RefitServer) -> Iterator[grpc.Channel]:
    with connect(refit_service.port) as channel:
        yield channel


@pytest.fixture(scope="session")
def stub(channel: grpc.Channel) -> refit_pb2_grpc.RefitStub:
    return refit_pb2_grpc.RefitStub(channel)
