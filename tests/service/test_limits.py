"""Long calls cannot take every server thread: streams are capped at REFIT_MAX_STREAMS, all calls
at REFIT_GRPC_WORKERS, and the call past either limit gets RESOURCE_EXHAUSTED at once."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY

from refit.v1 import refit_pb2 as pb
from refit.v1 import refit_pb2_grpc
from service.server import RefitServer
from tests.service.conftest import connect, offline_settings, publish_records, start_service


def predicts_in_flight() -> float:
    """The service's own gauge (this process): Predicts that hold a server thread now."""
    return REGISTRY.get_sample_value("refit_rpc_in_flight", {"method": "Predict"}) or 0.0


class HeldStream:
    """A PredictStream the client keeps open: the server holds a thread for it."""

    def __init__(self, stub: refit_pb2_grpc.RefitStub) -> None:
        self.outbox: queue.Queue = queue.Queue()
        self.call = stub.PredictStream(iter(self.outbox.get, None), timeout=60)

    def answer(self) -> pb.PredictResponse:
        self.outbox.put(pb.PredictRequest(image=b"x", model="imagenet", request_id="r"))
        return next(self.call)

    def close(self) -> None:
        self.outbox.put(None)
        list(self.call)


@pytest.fixture
def limited(tmp_path: Path, silent_torchserve: str) -> Iterator[RefitServer]:
    publish_records(tmp_path, {"imagenet": ["1"]})
    settings = offline_settings(
        tmp_path,
        workers=3,
        max_streams=2,
        torchserve_inference=silent_torchserve,
        upstream_timeout_s=8.0,
    )
    refit = start_service(settings, wait_ready=False)
    yield refit
    refit.stop()


def test_streams_past_the_limit_are_refused_and_unary_calls_still_served(
    limited: RefitServer,
) -> None:
    with connect(limited.port) as channel:
        stub = refit_pb2_grpc.RefitStub(channel)
        held = [HeldStream(stub) for _ in range(2)]
        for stream in held:
            assert stream.answer().error.code == "INVALID_ARGUMENT"  # in progress, holding
        third = HeldStream(stub)
        with pytest.raises(grpc.RpcError) as caught:
            third.answer()
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "REFIT_MAX_STREAMS=2" in caught.value.details()
        assert stub.ListModels(pb.ListModelsRequest(), timeout=5).models  # a thread was left
        for stream in held:
            stream.close()
        again = HeldStream(stub)  # the slots were given back
        assert again.answer().error.code == "INVALID_ARGUMENT"
        again.close()


def test_calls_past_the_worker_count_are_refused_at_once(
    limited: RefitServer, cat_jpeg: bytes
) -> None:
    with connect(limited.port) as channel:
        stub = refit_pb2_grpc.RefitStub(channel)
        held = [HeldStream(stub) for _ in range(2)]
        for stream in held:
            stream.answer()
        request = pb.PredictRequest(image=cat_jpeg, model="imagenet")
        slow = threading.Thread(target=_quietly(stub.Predict, request, timeout=30))
        before = predicts_in_flight()
        slow.start()  # waits on the silent TorchServe: the third and last worker
        deadline = time.monotonic() + 30
        while predicts_in_flight() == before:  # the server took it: no worker is left
            assert time.monotonic() < deadline, "the third call never reached the service"
            time.sleep(0.01)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            stub.ListModels(pb.ListModelsRequest(), timeout=5)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() - start < 2  # refused at once, not queued
        for stream in held:
            stream.close()
        slow.join(30)
        assert stub.ListModels(pb.ListModelsRequest(), timeout=5).models


def _quietly(fn, *args, **kwargs):
    def run() -> None:
        with contextlib.suppress(grpc.RpcError):  # DEADLINE_EXCEEDED is expected
            fn(*args, **kwargs)

    return run


def test_settings_keep_threads_for_unary_calls() -> None:
    from service.config import ServiceSettings

    env = {"REFIT_ADMIN_TOKEN": "a" * 16}
    assert ServiceSettings.from_env({**env, "REFIT_GRPC_WORKERS": "10"}).max_streams == 5
    with pytest.raises(ValueError, match="REFIT_MAX_STREAMS"):
        ServiceSettings.from_env({**env, "REFIT_GRPC_WORKERS": "8", "REFIT_MAX_STREAMS": "8"})
