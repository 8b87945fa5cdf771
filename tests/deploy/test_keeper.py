"""TorchServe's token authorization with refit's key keeper (deploy/torchserve/keeper.py), on a
real TorchServe whose keys live 12 s (so the keeper replaces them every 6 s) and a policed store:
the keys reach the store for refit and nowhere else, a client holding replaced keys carries on,
and no key is replaced while the store cannot take the new one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from local_stack.torchserve import KEEPER, TorchServePorts, TorchServeProcess
from refit.netutil import free_port
from refit.storage import S3Store
from refit.torchserve import Keys, StoreKeys, TorchServeClient
from refit.torchserve_api import management_pb2, management_pb2_grpc
from tests.conftest import MotoServer, wait_until
from tests.faults import S3FaultProxy

pytestmark = pytest.mark.integration

LIFETIME_MIN = 0.2  # token_expiration_min: 12 s, a replacement every 6 s
REPLICA = "127.0.0.1"


@pytest.fixture(scope="module")
def bucket(moto_server: MotoServer) -> str:
    name = "keeper-keys"
    S3Store(moto_server.settings).ensure_bucket(name)
    return name


@pytest.fixture(scope="module")
def store_link(moto_server: MotoServer) -> Iterator[S3FaultProxy]:
    """The keeper's way to the store, which the tests cut."""
    proxy = S3FaultProxy(moto_server.settings)
    proxy.start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def torchserve(
    tmp_path_factory, moto_server: MotoServer, bucket: str, store_link: S3FaultProxy
) -> Iterator[TorchServeProcess]:
    """TorchServe under its keeper with --publish, as the container runs it."""
    process = TorchServeProcess(
        tmp_path_factory.mktemp("keeper"),
        TorchServePorts(*(free_port() for _ in range(5))),
        "http://127.0.0.1:1/.*",
        {"token_expiration_min": LIFETIME_MIN},
    )
    process.prepare()
    identity = store_link.behind(moto_server.identity("torchserve", bucket))
    env = {
        **process.env(),
        **identity.to_env(),
        "REFIT_BUCKET": bucket,
        "REFIT_TORCHSERVE_REPLICA": REPLICA,
    }
    command = process.command()
    command.insert(command.index(str(KEEPER)) + 1, "--publish")
    with process.log_file.open("a") as log:
        keeper = subprocess.Popen(
            command, env=env, cwd=process.home, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    process._process = keeper  # stop() ends its process group
    try:
        wait_until(process.is_healthy, 90, "TorchServe healthy")
        yield process
    finally:
        process.stop()


def published(moto_server: MotoServer, bucket: str) -> dict | None:
    info = S3Store(moto_server.settings).stat(bucket, f"torchserve/keys/{REPLICA}.json")
    if info is None:
        return None
    return json.loads(S3Store(moto_server.settings).get(bucket, info.key))


def key_file(torchserve: TorchServeProcess) -> dict:
    return json.loads(torchserve.key_file.read_text())


def list_models(torchserve: TorchServeProcess, management_key: str) -> grpc.StatusCode:
    """A management call with ``management_key``: OK or the refusal's code."""
    address = f"127.0.0.1:{torchserve.ports.grpc_management}"
    with grpc.insecure_channel(address) as channel:
        stub = management_pb2_grpc.ManagementAPIsServiceStub(channel)
        try:
            stub.ListModels(
                management_pb2.ListModelsRequest(limit=1),
                metadata=[("authorization", f"Bearer {management_key}")],
                timeout=10,
            )
        except grpc.RpcError as error:
            return error.code()
    return grpc.StatusCode.OK


def test_the_keys_are_published_without_the_api_key(torchserve, moto_server, bucket) -> None:
    wait_until(lambda: published(moto_server, bucket) is not None, 30, "keys published")
    document = published(moto_server, bucket)
    assert set(document) == {"management", "inference", "expires"}  # never the API key
    assert list_models(torchserve, document["management"]) == grpc.StatusCode.OK
    assert list_models(torchserve, "") == grpc.StatusCode.PERMISSION_DENIED
    assert list_models(torchserve, key_file(torchserve)["API"]["key"]) == (
        grpc.StatusCode.PERMISSION_DENIED  # the API key only replaces keys
    )


def test_replaced_keys_are_published_and_a_client_carries_on(
    torchserve, moto_server, bucket
) -> None:
    keys = S3Store(moto_server.settings)
    client = TorchServeClient(
        f"127.0.0.1:{torchserve.ports.grpc_inference}",
        f"127.0.0.1:{torchserve.ports.grpc_management}",
        keys=StoreKeys(lambda key: keys.get(bucket, key)),
    )
    try:
        wait_until(lambda: published(moto_server, bucket) is not None, 30, "keys published")
        first = published(moto_server, bucket)
        assert client.served_versions() == []  # holds the first keys now
        wait_until(lambda: published(moto_server, bucket) != first, 30, "keys replaced")
        assert list_models(torchserve, first["management"]) == grpc.StatusCode.PERMISSION_DENIED
        assert client.served_versions() == []  # refused once, read the new keys, carried on
        assert client.ping()
        assert Keys.parse(json.dumps(published(moto_server, bucket))) == Keys.parse(
            torchserve.key_file.read_text()
        )
    finally:
        client.close()


def test_no_key_is_replaced_while_the_store_cannot_take_it(
    torchserve, moto_server, bucket, store_link
) -> None:
    wait_until(lambda: published(moto_server, bucket) is not None, 30, "keys published")
    store_link.cut()
    try:
        held = key_file(torchserve)["management"]["key"]
        time.sleep(LIFETIME_MIN * 60 * 0.75)  # past the next replacement's time
        assert key_file(torchserve)["management"]["key"] == held
        assert published(moto_server, bucket)["management"] == held
    finally:
        store_link.restore()
    wait_until(lambda: published(moto_server, bucket)["management"] != held, 30, "replaced after")
    assert published(moto_server, bucket)["management"] == key_file(torchserve)["management"]["key"]


def test_the_keeper_passes_a_stop_on_and_ends_with_torchserve(tmp_path: Path) -> None:
    """SIGTERM to the keeper stops TorchServe (docker stop, a pod's termination)."""
    process = TorchServeProcess(
        tmp_path, TorchServePorts(*(free_port() for _ in range(5))), "http://127.0.0.1:1/.*"
    )
    process.prepare()
    with process.log_file.open("a") as log:
        keeper = subprocess.Popen(
            process.command(), env=process.env(), cwd=process.home, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_until(process.is_healthy, 90, "TorchServe healthy")
        assert process.server_pid() is not None
        keeper.terminate()  # the keeper alone, not its process group
        keeper.wait(60)  # it ends once TorchServe has
        wait_until(lambda: process.server_pid() is None, 30, "TorchServe gone")
    finally:
        if keeper.poll() is None:
            os.killpg(keeper.pid, signal.SIGKILL)
