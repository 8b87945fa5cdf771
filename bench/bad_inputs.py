"""Bad inputs tried against a running stack (service, TorchServe and trainer as their own
processes, the embedded store): each case's RPC, input and the status the service returned,
as the markdown table in docs/reliability.md "Bad inputs". Exits 1 when a status differs from
the expected one, or when the service lost anything (models, versions, defaults) or stopped
answering a good Predict.

Usage: .venv/bin/python bench/bad_inputs.py
"""

from __future__ import annotations

import io
import queue
import struct
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.protobuf.json_format import MessageToDict
from PIL import Image
from running_stack import RunningStack, running_stack
from skimage import data

from cli.client import ClientSettings, connect
from local_stack.demo import dataset, upload
from refit.storage import StorageSettings
from refit.v1 import refit_pb2 as pb
from refit.v1 import refit_pb2_grpc

Stub = refit_pb2_grpc.RefitStub


@dataclass(frozen=True)
class Case:
    rpc: str
    what: str
    expected: str
    call: Callable[[dict[str, Stub]], object]  # gets stubs by role: admin, predict, none, wrong


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
UNKNOWN_JOB = "job-20000101T000000-00000000"


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
             retrain(dataset_uri="s3://datasets/nothing-here")),
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
    models = stub.ListModels(pb.ListModelsRequest(), timeout=30).models
    return [MessageToDict(m) for m in models]


def run(stack: RunningStack) -> list[tuple[Case, str, str]]:
    address = stack.address
    stubs = {
        "admin": Stub(connect(ClientSettings(address, token=stack.admin_token))),
        "predict": Stub(connect(ClientSettings(address, token=stack.predict_token))),
        "none": Stub(connect(ClientSettings(address))),
        "wrong": Stub(connect(ClientSettings(address, token="x" * 43))),
    }
    store = StorageSettings(data_dir=stack.data_dir).open()
    _, train, _ = dataset(10, 1)
    stubs["dataset"] = upload(store, "datasets", "colours", train)
    stubs["max_streams"] = 16
    before = snapshot(stubs["admin"])
    results = []
    for case in cases():
        try:
            answer = case.call(stubs)
            status, detail = (answer, "") if isinstance(answer, str) else ("OK", "")
        except grpc.RpcError as exc:
            status, detail = exc.code().name, exc.details() or ""
        results.append((case, status, detail))
    after = snapshot(stubs["admin"])
    good = stubs["predict"].Predict(pb.PredictRequest(image=COFFEE, model="imagenet"), timeout=30)
    results.append((Case("ListModels", "after all of the above: unchanged", "OK", None),
                    "OK" if after == before else "CHANGED", ""))  # fmt: skip
    results.append((Case("Predict", "coffee.jpg after all of the above", "OK", None),
                    "OK" if good.predictions[0].label == "espresso" else "WRONG", ""))  # fmt: skip
    return results


def report(results: list[tuple[Case, str, str]]) -> int:
    print("| # | RPC | input | status returned | message (start) |")
    print("|---|---|---|---|---|")
    failures = 0
    for n, (case, status, detail) in enumerate(results, 1):
        mark = "" if status == case.expected else f" (expected {case.expected})"
        failures += bool(mark)
        message = detail.replace("|", "\\|").replace("\n", " ")[:90]
        print(f"| {n} | {case.rpc} | {case.what} | {status}{mark} | {message} |")
    print(f"\n{len(results)} inputs, {failures} unexpected", file=sys.stderr)
    return 1 if failures else 0


def main() -> int:
    with running_stack(trainer=True) as stack:
        return report(run(stack))


if __name__ == "__main__":
    sys.exit(main())
