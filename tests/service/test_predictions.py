"""PredictStream's ordered map: a client that goes away never leaves a thread behind."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from refit.v1 import refit_pb2 as pb
from refit.v1 import refit_pb2_grpc
from service.predictions import ordered_map
from service.server import RefitServer
from tests.service.conftest import connect, offline_settings, publish_records, start_service

READER = "ordered-map-reader"


def readers() -> int:
    return sum(t.name == READER for t in threading.enumerate())


def wait_for_readers(count: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while readers() > count and time.monotonic() < deadline:
        time.sleep(0.05)
    return readers()


def test_results_come_in_order_with_at_most_window_in_flight() -> None:
    in_flight, most = 0, 0
    lock = threading.Lock()

    def slow_square(x: int) -> int:
        nonlocal in_flight, most
        with lock:
            in_flight += 1
            most = max(most, in_flight)
        time.sleep(0.01 * (x % 3))
        with lock:
            in_flight -= 1
        return x * x

    with ThreadPoolExecutor(8) as pool:
        assert list(ordered_map(slow_square, range(30), pool, 3)) == [x * x for x in range(30)]
    assert most <= 3


def test_reader_stops_when_the_consumer_goes_away_with_a_full_window() -> None:
    before = readers()
    with ThreadPoolExecutor(4) as pool:
        results = ordered_map(lambda x: x, itertools.count(), pool, 2)  # an endless client
        assert next(results) == 0
        time.sleep(0.2)  # the reader fills the window and waits for a slot
        results.close()  # the servicer's generator is dropped: the client cancelled
        assert wait_for_readers(before, 5.0) == before


@pytest.fixture
def slow_service(tmp_path: Path, silent_torchserve: str) -> Iterator[RefitServer]:
    publish_records(tmp_path, {"imagenet": ["1"]})
    settings = offline_settings(
        tmp_path,
        torchserve_inference=silent_torchserve,
        upstream_timeout_s=2.0,
        stream_window=2,
    )
    refit = start_service(settings, wait_ready=False)
    yield refit
    refit.stop()


def test_cancelled_stream_leaves_no_reader_behind(slow_service: RefitServer, cat_jpeg) -> None:
    before = readers()
    request = pb.PredictRequest(image=cat_jpeg, model="imagenet")
    with connect(slow_service.port) as channel:
        stub = refit_pb2_grpc.RefitStub(channel)
        call = stub.PredictStream(iter([request] * 20), timeout=60)
        deadline = time.monotonic() + 30  # two Predicts wait on TorchServe; the reader started
        while readers() != before + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert readers() == before + 1
        call.cancel()
        with pytest.raises(grpc.RpcError):
            next(call)
    # The in-flight Predicts end at their 2 s upstream timeout; then the reader must go.
    assert wait_for_readers(before, 15.0) == before
