"""Several service replicas against one object store (issue 12): each serves, and a promotion or
a rollback made through one is answered by the others within REFIT_WATCH_INTERVAL_S (1 s) plus
one registry read, not the reconcile interval (30 s): each service lists the registry's keys and
etags every second and re-reads it when they change.

Two real service processes, one store (moto), one TorchServe (the session's), a tiny model with
two versions (one TorchServe worker each; unregistered at the end)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from local_stack.torchserve import TorchServeProcess
from refit.errors import RefitError
from refit.registry import Registry, VersionRecord
from refit.storage import S3Store
from refit.torchserve import TorchServeClient
from refit.v1 import refit_pb2 as pb
from refit.v1 import refit_pb2_grpc
from tests.conftest import MotoServer, free_port
from tests.service.conftest import ADMIN_TOKEN, PREDICT_TOKEN, connect, wait_serving

pytestmark = pytest.mark.integration
MODEL = "tiny"
SEEN_BOUND_S = 5.0  # documented: about 1 s (the watch) plus a registry read; slack for load


def tiny_archive(store: S3Store, bucket: str, version: str) -> VersionRecord:
    import torch

    from trainer.package import build_archive
    from trainer.preprocessing import Preprocessing

    torch.manual_seed(int(version))
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, stride=2),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 2),
    ).eval()
    with tempfile.TemporaryDirectory() as tmp:
        archive = build_archive(
            model,
            model_name=MODEL,
            version=version,
            class_names=["left", "right"],
            preprocessing=Preprocessing(resize_size=40, crop_size=32),
            metadata={"backbone": "tiny"},
            out_dir=Path(tmp),
        )
        key = Registry.archive_key(MODEL, archive.digest)
        store.put_file(bucket, key, archive.path)
    return VersionRecord(MODEL, version, key, ["left", "right"])


@pytest.fixture(scope="module")
def two_versions(moto_server: MotoServer) -> str:
    store = S3Store(moto_server.settings)
    bucket = f"replicas-{uuid.uuid4().hex[:8]}"
    store.ensure_bucket(bucket)
    registry = Registry(store, bucket)
    for version in ("1", "2"):
        registry.add(tiny_archive(store, bucket, version))
    registry.set_default(MODEL, "1")
    return bucket


def service_process(
    moto: MotoServer, bucket: str, ts: TorchServeProcess
) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {
        **os.environ,
        "REFIT_GRPC_ADDRESS": f"127.0.0.1:{port}",
        "REFIT_METRICS_ADDRESS": f"127.0.0.1:{free_port()}",
        # Never the default 50054: it lies in the ephemeral range, where a client socket of
        # another test can hold it.
        "REFIT_HEALTH_ADDRESS": f"127.0.0.1:{free_port()}",
        "REFIT_TORCHSERVE_INFERENCE": f"127.0.0.1:{ts.ports.grpc_inference}",
        "REFIT_TORCHSERVE_MANAGEMENT": f"127.0.0.1:{ts.ports.grpc_management}",
        "REFIT_TORCHSERVE_KEYS": ts.keys,
        "REFIT_TRAINER_ADDRESS": f"127.0.0.1:{free_port()}",  # none: not needed here
        **moto.identity("service", bucket).to_env(),
        "REFIT_BUCKET": bucket,
        "REFIT_ADMIN_TOKEN": ADMIN_TOKEN,
        "REFIT_PREDICT_TOKEN": PREDICT_TOKEN,
    }  # the reconcile interval stays at its default, 30 s
    process = subprocess.Popen(
        [sys.executable, "-m", "service.server"], env=env, stdin=subprocess.DEVNULL
    )
    return process, port


@pytest.fixture(scope="module")
def services(
    moto_server: MotoServer, two_versions: str, torchserve: TorchServeProcess
) -> Iterator[list[refit_pb2_grpc.RefitStub]]:
    started = [service_process(moto_server, two_versions, torchserve) for _ in range(2)]
    channels = []
    try:
        for _, port in started:
            wait_serving(port, timeout_s=180)
            channels.append(connect(port))
        yield [refit_pb2_grpc.RefitStub(channel) for channel in channels]
    finally:
        for channel in channels:
            channel.close()
        for process, _ in started:
            process.terminate()
            process.wait(30)
        ports = torchserve.ports
        client = TorchServeClient(
            f"127.0.0.1:{ports.grpc_inference}",
            f"127.0.0.1:{ports.grpc_management}",
            keys=torchserve.key_source(),
        )
        # TorchServe refuses to unregister its default version while others exist, and which
        # version it holds as default when the services stop depends on their last reconcile
        # (a pass from a service whose catalog had not seen the rollback yet may have set v2).
        client.set_default(MODEL, "1")
        for version in ("2", "1"):  # free the session TorchServe's memory (the default last)
            unregister_when_idle(client, version)
        client.close()


def unregister_when_idle(client: TorchServeClient, version: str, timeout_s: float = 30) -> None:
    """TorchServe's gRPC API answers any exception it does not map with UNKNOWN and no details
    (unregistering its default version is one): retry for a while."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.unregister(MODEL, version)
        except RefitError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def answered_version(stub: refit_pb2_grpc.RefitStub, image: bytes) -> str:
    return stub.Predict(pb.PredictRequest(image=image, model=MODEL), timeout=30).version


def seconds_until_seen(stub: refit_pb2_grpc.RefitStub, version: str, image: bytes) -> float:
    start = time.monotonic()
    while answered_version(stub, image) != version:
        if time.monotonic() - start > 60:
            raise TimeoutError(f"v{version} not answered within 60s")
        time.sleep(0.05)
    return time.monotonic() - start


def test_each_service_replica_serves(services, cat_jpeg) -> None:
    assert [answered_version(stub, cat_jpeg) for stub in services] == ["1", "1"]


def test_a_promotion_and_a_rollback_are_seen_through_the_other_service(services, cat_jpeg) -> None:
    a, b = services
    a.SetDefaultVersion(pb.SetDefaultVersionRequest(model=MODEL, version="2"), timeout=60)
    assert answered_version(a, cat_jpeg) == "2"  # the one it was made through: at once
    promoted = seconds_until_seen(b, "2", cat_jpeg)
    b.SetDefaultVersion(pb.SetDefaultVersionRequest(model=MODEL, version="1"), timeout=60)
    rolled_back = seconds_until_seen(a, "1", cat_jpeg)
    print(f"promotion seen through the other service after {promoted:.2f}s, "
          f"rollback after {rolled_back:.2f}s")  # fmt: skip
    assert promoted < SEEN_BOUND_S and rolled_back < SEEN_BOUND_S
    model = b.GetModel(pb.GetModelRequest(name=MODEL), timeout=10)
    assert model.default_version == "1" and model.default_served
