"""Dynamic batching through a real TorchServe: a version registered with its recorded batch
settings answers a concurrent burst image by image, exactly as it answers them one at a time, and
an image the handler cannot decode fails alone, as INVALID_ARGUMENT, while its batch succeeds."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from PIL import Image

from local_stack.torchserve import TorchServeProcess
from refit.registry import Batching, Registry, VersionRecord
from refit.v1 import refit_pb2 as pb
from refit.v1 import refit_pb2_grpc
from service.server import RefitServer
from tests.conftest import MotoServer, encode
from tests.service.conftest import (
    bucket_with_imagenet_archive,
    connect,
    service_settings,
    start_service,
)

pytestmark = pytest.mark.integration
# A long delay makes a concurrent burst form full batches of 4 however loaded the machine is.
BATCHING = Batching(batch_size=4, max_batch_delay_ms=300)
MODEL = f"batched-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def batched_bucket(moto_server: MotoServer, refit_bucket: str) -> str:
    """MODEL v1: imagenet v1's archive, recorded with BATCHING."""
    store, name, source = bucket_with_imagenet_archive(moto_server, refit_bucket, "batched")
    registry = Registry(store, name)
    registry.add(
        VersionRecord(MODEL, "1", source.archive_key, source.class_names, batching=BATCHING)
    )
    registry.set_default(MODEL, "1")
    return name


@pytest.fixture(scope="module")
def service(
    moto_server: MotoServer, batched_bucket: str, torchserve: TorchServeProcess
) -> Iterator[RefitServer]:
    refit = start_service(service_settings(moto_server, batched_bucket, torchserve))
    yield refit
    refit.stop()


@pytest.fixture(scope="module")
def api(service: RefitServer) -> Iterator[refit_pb2_grpc.RefitStub]:
    with connect(service.port) as channel:
        yield refit_pb2_grpc.RefitStub(channel)


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    from skimage import data

    arrays = [data.coffee(), data.chelsea(), data.astronaut(), data.rocket()]
    plain = [Image.new("RGB", (96, 64), colour) for colour in ("red", "navy", "gold", "white")]
    return [encode(Image.fromarray(a)) for a in arrays] + [encode(p, "PNG") for p in plain]


def predict(api: refit_pb2_grpc.RefitStub) -> Callable[[bytes], pb.PredictResponse]:
    return lambda image: api.Predict(pb.PredictRequest(image=image, model=MODEL), timeout=60)


def outcome(call: Callable[[], pb.PredictResponse]) -> pb.PredictResponse | grpc.RpcError:
    try:
        return call()
    except grpc.RpcError as exc:
        return exc


def burst(api: refit_pb2_grpc.RefitStub, images: list[bytes]) -> list:
    """All at once: TorchServe's worker gets them in batches of BATCHING.batch_size."""
    ask = predict(api)
    with ThreadPoolExecutor(len(images)) as pool:
        return list(pool.map(lambda image: outcome(lambda: ask(image)), images))


def labels(answer: pb.PredictResponse) -> list[tuple[str, float]]:
    return [(p.label, p.score) for p in answer.predictions]


def assert_same_answer(batched: pb.PredictResponse, alone: pb.PredictResponse) -> None:
    assert [label for label, _ in labels(batched)] == [label for label, _ in labels(alone)]
    for (_, got), (_, expected) in zip(labels(batched), labels(alone), strict=True):
        assert got == pytest.approx(expected, abs=1e-3)


@pytest.fixture(scope="module")
def alone(api: refit_pb2_grpc.RefitStub, photos: list[bytes]) -> list[pb.PredictResponse]:
    """Each photo on its own: a batch of one, after waiting max_batch_delay for company."""
    answers = []
    for image in photos:
        start = time.perf_counter()
        answers.append(predict(api)(image))
        assert time.perf_counter() - start >= 0.9 * BATCHING.max_batch_delay_ms / 1000
    return answers


def test_the_registration_carries_the_versions_batching(
    api: refit_pb2_grpc.RefitStub, torchserve: TorchServeProcess
) -> None:
    described = torchserve.describe(MODEL, "1")  # TorchServe's describe API
    assert (described["batchSize"], described["maxBatchDelay"]) == (4, 300)
    (version,) = api.GetModel(pb.GetModelRequest(name=MODEL), timeout=10).versions
    assert (version.batching.batch_size, version.batching.max_batch_delay_ms) == (4, 300)


def test_a_concurrent_burst_gets_each_images_own_answer(
    api: refit_pb2_grpc.RefitStub, photos: list[bytes], alone: list[pb.PredictResponse]
) -> None:
    answers = burst(api, photos + photos[::-1])
    for answer, expected in zip(answers, alone + alone[::-1], strict=True):
        assert not isinstance(answer, grpc.RpcError), answer
        assert_same_answer(answer, expected)


def truncated_bmp() -> bytes:
    """Passes the service's header checks (BMP has no end marker); Pillow's decode fails."""
    bmp = encode(Image.new("RGB", (64, 64), "red"), "BMP")
    return bmp[: len(bmp) // 2]


def bmp_with_bad_compression() -> bytes:
    """A 24-bit BMP claiming RLE8 compression: a sound header, then ValueError in the decode."""
    bmp = bytearray(encode(Image.new("RGB", (8, 8), "red"), "BMP"))
    bmp[30:34] = (1).to_bytes(4, "little")
    return bytes(bmp)


@pytest.mark.parametrize("bad_image", [truncated_bmp, bmp_with_bad_compression])
def test_one_bad_image_in_a_burst_fails_alone(
    api: refit_pb2_grpc.RefitStub,
    photos: list[bytes],
    alone: list[pb.PredictResponse],
    bad_image: Callable[[], bytes],
) -> None:
    answers = burst(api, [*photos[:3], bad_image(), *photos[3:]])
    error = answers.pop(3)
    assert isinstance(error, grpc.RpcError)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "could not be decoded" in error.details()
    for answer, expected in zip(answers, alone, strict=True):
        assert not isinstance(answer, grpc.RpcError), answer
        assert_same_answer(answer, expected)
