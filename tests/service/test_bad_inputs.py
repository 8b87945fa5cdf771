"""Bad inputs against the service with a real TorchServe and trainer behind it: each case's RPC
and input get the status docs/reliability.md "Bad inputs" lists, and afterwards no model, version
or default changed and a good Predict still answers."""

from __future__ import annotations

import io
import queue
import struct
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf.json_format import MessageToDict
from PIL import Image
from skimage import data

from local_stack.torchserve import TorchServeProcess
from refit.storage import S3Store
from refit.v1 import refit_pb2 as pb
from refit.v1 import refit_pb2_grpc
from service.server import RefitServer
from tests.conftest import MotoServer
from tests.service.conftest import PREDICT_TOKEN, connect, service_settings, start_service
from tests.service.retraining import UNKNOWN_JOB, trainer_settings
from tests.trainer.synthetic import upload_colours
from trainer.server import TrainerServer, build_server

Stub = refit_pb2_grpc.RefitStub
MAX_STREAMS = 4
pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Case:
    rpc: str
    what: str
    expected: str
    call: Callable[[dict], object]  # gets stubs by role (admin, predict, none, wrong) and more

    def __str__(self) -> str:
        return f"{self.rpc}: {self.what}"


def jpeg(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG")
    return buffer.getvalue()


def bmp_truncated() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, "BMP")
    return buffer.getvalue()[:6000]


def png_bomb(side: int = 30_000) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * ((side + 7) // 8 + 1) * 64)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


COFFEE = jpeg(data.coffee())


def predict(
    image: bytes = COFFEE,
    model: str = "imagenet",
    version: str = "",
    *,
    role: str = "admin",
    timeout: float = 30,
    metadata: tuple = (),
) -> Callable:
    request = pb.PredictRequest(image=image, model=model, version=version)
    return lambda s: s[role].Predict(request, timeout=timeout, metadata=metadata)


def retrain(role: str = "admin", hp: dict | None = None, **fields: str) -> Callable:
    def call(s: dict) -> object:
        values = {"model": "flowers", "dataset_uri": s["dataset"], **fields}
        request = pb.RetrainRequest(**values, hyperparameters=pb.Hyperparameters(**(hp or {})))
        return s[role].Retrain(request, timeout=30)

    return call


def cases() -> list[Case]:
    return [
        # authentication and roles
        Case("Predict", "no token", "UNAUTHENTICATED", predict(role="none")),
        Case("Predict", "unknown token", "UNAUTHENTICATED", predict(role="wrong")),
        Case("Predict", "`authorization: Basic ...` (not a bearer token)", "UNAUTHENTICATED",
             predict(role="none", metadata=(("authorization", "Basic YWRtaW46YWRtaW4="),))),
        Case("Retrain", "predict token", "PERMISSION_DENIED", retrain(role="predict")),
        Case("DeleteVersion", "predict token", "PERMISSION_DENIED", lambda s: s["predict"]
             .DeleteVersion(pb.DeleteVersionRequest(model="imagenet", version="1"), timeout=30)),
        Case("SetDefaultVersion", "predict token", "PERMISSION_DENIED", lambda s: s["predict"]
             .SetDefaultVersion(pb.SetDefaultVersionRequest(model="imagenet", version="1"))),
        Case("CancelJob", "no token", "UNAUTHENTICATED", lambda s: s["none"]
             .CancelJob(pb.CancelJobRequest(id=UNKNOWN_JOB), timeout=30)),
        # images
        Case("Predict", "empty image", "INVALID_ARGUMENT", predict(b"")),
        Case("Predict", "text bytes, not an image", "INVALID_ARGUMENT", predict(b"hello")),
        Case("Predict", "JPEG cut in half", "INVALID_ARGUMENT", predict(COFFEE[:20_000])),
        Case("Predict", "BMP cut short (caught by the handler)", "INVALID_ARGUMENT",
             predict(bmp_truncated())),
        Case("Predict", "PNG bomb, 30000x30000 pixels in 2 KB", "INVALID_ARGUMENT",
             predict(png_bomb())),
        Case("Predict", "8 MiB + 2 bytes image (REFIT_MAX_IMAGE_BYTES: 8 MiB)",
             "RESOURCE_EXHAUSTED", predict(b"\xff\xd8" + bytes(8 << 20))),
        Case("Predict", "20 MiB message (over the gRPC receive limit)", "RESOURCE_EXHAUSTED",
             predict(bytes(20 << 20))),
        Case("Predict", "deadline of 1 ms", "DEADLINE_EXCEEDED", predict(timeout=0.001)),
        # identifiers
        Case("Predict", "model ''", "INVALID_ARGUMENT", predict(model="")),
        Case("Predict", "model 'Bad Name!'", "INVALID_ARGUMENT", predict(model="Bad Name!")),
        Case("Predict", "model 'imagenet\\n'", "INVALID_ARGUMENT", predict(model="imagenet\n")),
        Case("Predict", "version '../../other/versions/1'", "INVALID_ARGUMENT",
             predict(version="../../other/versions/1")),
        Case("Predict", "unknown model 'nosuchmodel'", "NOT_FOUND", predict(model="nosuchmodel")),
        Case("Predict", "unknown version '999'", "NOT_FOUND", predict(version="999")),
        Case("GetModel", "name '../registry'", "INVALID_ARGUMENT",
             lambda s: s["admin"].GetModel(pb.GetModelRequest(name="../registry"), timeout=30)),
        Case("DeleteVersion", "imagenet, version '../../other/versions/1' (the reported exploit)",
             "INVALID_ARGUMENT", lambda s: s["admin"].DeleteVersion(
                 pb.DeleteVersionRequest(model="imagenet", version="../../other/versions/1"))),
        Case("DeleteVersion", "the default version", "FAILED_PRECONDITION",
             lambda s: s["admin"].DeleteVersion(
                 pb.DeleteVersionRequest(model="imagenet", version="1"), timeout=30)),
        Case("SetDefaultVersion", "version '/etc/passwd'", "INVALID_ARGUMENT",
             lambda s: s["admin"].SetDefaultVersion(
                 pb.SetDefaultVersionRequest(model="imagenet", version="/etc/passwd"))),
        Case("SetDefaultVersion", "unknown version '42'", "NOT_FOUND",
             lambda s: s["admin"].SetDefaultVersion(
                 pb.SetDefaultVersionRequest(model="imagenet", version="42"), timeout=30)),
        Case("GetJob", "id '../../registry/imagenet/default'", "INVALID_ARGUMENT",
             lambda s: s["admin"].GetJob(
                 pb.GetJobRequest(id="../../registry/imagenet/default"), timeout=30)),
        Case("GetJob", "unknown, well-formed id", "NOT_FOUND",
             lambda s: s["admin"].GetJob(pb.GetJobRequest(id=UNKNOWN_JOB), timeout=30)),
        Case("CancelJob", "empty id", "INVALID_ARGUMENT",
             lambda s: s["admin"].CancelJob(pb.CancelJobRequest(id=""), timeout=30)),
        Case("WatchJob", "id 'job-x'", "INVALID_ARGUMENT",
             lambda s: list(s["admin"].WatchJob(pb.WatchJobRequest(id="job-x"), timeout=30))),
        Case("ListJobs", "model 'BAD'", "INVALID_ARGUMENT",
             lambda s: s["admin"].ListJobs(pb.ListJobsRequest(model="BAD"), timeout=30)),
        # retrain requests
        Case("Retrain", "dataset_uri '/local/path'", "INVALID_ARGUMENT",
             retrain(dataset_uri="/local/path")),
        Case("Retrain", "dataset_uri 's3://../etc'", "INVALID_ARGUMENT",
             retrain(dataset_uri="s3://../etc")),
        Case("Retrain", "dataset bucket that does not exist", "INVALID_ARGUMENT",
             retrain(dataset_uri="s3://no-such-bucket/flowers")),
        Case("Retrain", "dataset prefix with no objects", "INVALID_ARGUMENT",
             lambda s: retrain(dataset_uri=s["dataset"] + "-nothing-here")(s)),
        Case("Retrain", "epochs 100000", "INVALID_ARGUMENT", retrain(hp={"epochs": 100000})),
        Case("Retrain", "lr 5", "INVALID_ARGUMENT", retrain(hp={"lr": 5.0})),
        Case("Retrain", "batch_size 4096", "INVALID_ARGUMENT", retrain(hp={"batch_size": 4096})),
        Case("Retrain", "freeze 99", "INVALID_ARGUMENT", retrain(hp={"freeze": 99})),
        Case("Retrain", "backbone 'resnet1000'", "INVALID_ARGUMENT",
             retrain(backbone="resnet1000")),
        Case("Retrain", "base_version '7' (none)", "INVALID_ARGUMENT", retrain(base_version="7")),
        Case("Retrain", "a second job for a model with an active one", "ALREADY_EXISTS",
             second_job),
        Case("PredictStream", "one empty image among good ones", "OK, that item INVALID_ARGUMENT",
             stream_with_a_bad_item),
        Case("PredictStream", "one stream more than REFIT_MAX_STREAMS", "RESOURCE_EXHAUSTED",
             one_stream_too_many),
    ]  # fmt: skip


def second_job(s: dict) -> object:
    """A valid job for `busy`, then another: the second is refused; the first is cancelled."""
    request = pb.RetrainRequest(model="busy", dataset_uri=s["dataset"],
                                hyperparameters=pb.Hyperparameters(epochs=50))  # fmt: skip
    first = s["admin"].Retrain(request, timeout=30)
    try:
        return s["admin"].Retrain(request, timeout=30)
    finally:
        s["admin"].CancelJob(pb.CancelJobRequest(id=first.id), timeout=30)


def stream_with_a_bad_item(s: dict) -> str:
    images = [COFFEE, b"", COFFEE]
    requests = [pb.PredictRequest(image=i, model="imagenet", request_id=str(n))
                for n, i in enumerate(images)]  # fmt: skip
    answers = list(s["admin"].PredictStream(iter(requests), timeout=60))
    codes = [a.error.code or "OK" for a in answers]
    assert codes == ["OK", "INVALID_ARGUMENT", "OK"], codes
    return "OK, that item INVALID_ARGUMENT"


def one_stream_too_many(s: dict) -> object:
    held = []
    try:
        for _ in range(s["max_streams"] + 1):
            outbox: queue.Queue = queue.Queue()
            call = s["admin"].PredictStream(iter(outbox.get, None), timeout=60)
            outbox.put(pb.PredictRequest(image=b"", model="imagenet"))
            held.append((outbox, call))
            next(call)  # the last one raises
    finally:
        for outbox, call in held:
            outbox.put(None)
            call.cancel()


def snapshot(stub: Stub) -> list[dict]:
    return [MessageToDict(m) for m in stub.ListModels(pb.ListModelsRequest(), timeout=30).models]


@pytest.fixture(scope="module")
def dataset(moto_server: MotoServer) -> str:
    store = S3Store(moto_server.settings)
    return upload_colours(store, f"data-{uuid.uuid4().hex[:8]}", "colours", train=4, val=2)


@pytest.fixture(scope="module")
def trainer(
    moto_server: MotoServer, refit_bucket: str, torchserve: TorchServeProcess, dataset: str
) -> Iterator[TrainerServer]:
    server = build_server(trainer_settings(moto_server, refit_bucket, torchserve, dataset))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def service(
    moto_server: MotoServer, refit_bucket: str, torchserve: TorchServeProcess, trainer
) -> Iterator[RefitServer]:
    settings = service_settings(
        moto_server, refit_bucket, torchserve, trainer_address=f"127.0.0.1:{trainer.port}",
        max_streams=MAX_STREAMS,
    )  # fmt: skip
    refit = start_service(settings)
    yield refit
    refit.stop()


@pytest.fixture(scope="module")
def stubs(service: RefitServer, dataset: str) -> Iterator[dict]:
    channels = {
        "admin": connect(service.port),
        "predict": connect(service.port, PREDICT_TOKEN),
        "none": connect(service.port, ""),
        "wrong": connect(service.port, "x" * 43),
    }
    yield {role: Stub(c) for role, c in channels.items()} | {
        "dataset": dataset, "max_streams": MAX_STREAMS,
    }  # fmt: skip
    for channel in channels.values():
        channel.close()


@pytest.fixture(scope="module")
def before(stubs: dict) -> list[dict]:
    """The models as they were before any bad input."""
    return snapshot(stubs["admin"])


@pytest.mark.parametrize("case", cases(), ids=str)
def test_each_bad_input_gets_its_status(case: Case, stubs: dict, before: list[dict]) -> None:
    try:
        answer = case.call(stubs)
        status = answer if isinstance(answer, str) else "OK"
    except grpc.RpcError as exc:
        status = exc.code().name
    assert status == case.expected


def test_after_them_nothing_changed_and_predict_answers(stubs: dict, before: list[dict]) -> None:
    assert snapshot(stubs["admin"]) == before
    answer = stubs["predict"].Predict(pb.PredictRequest(image=COFFEE, model="imagenet"), timeout=30)
    assert answer.predictions[0].label == "espresso"
