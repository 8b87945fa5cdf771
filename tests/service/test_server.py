"""Predict, PredictStream, ListModels and GetModel over real gRPC against a real TorchServe."""

from __future__ import annotations

import struct
import zlib

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image
from prometheus_client import REGISTRY

from refit.v1 import refit_pb2 as pb
from refit.v1 import refit_pb2_grpc
from tests.conftest import encode, wait_until
from tests.service.conftest import connect, service_settings, start_service

COFFEE_LABELS = {"espresso", "cup", "coffee mug"}


def predict_error(stub: refit_pb2_grpc.RefitStub, **fields: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(pb.PredictRequest(**fields), timeout=30)
    return caught.value


def test_predict_coffee_top5(stub: refit_pb2_grpc.RefitStub, coffee_jpeg: bytes) -> None:
    answer = stub.Predict(pb.PredictRequest(image=coffee_jpeg, model="imagenet"), timeout=30)
    labels = [p.label for p in answer.predictions]
    assert len(labels) == 5
    assert COFFEE_LABELS & set(labels), labels
    assert answer.model == "imagenet" and answer.version == "1"
    scores = [p.score for p in answer.predictions]
    assert scores == sorted(scores, reverse=True) and 0 < scores[0] <= 1


def test_torchserve_workers_use_sockets_in_their_own_temp_dir(
    stub: refit_pb2_grpc.RefitStub, torchserve, coffee_jpeg: bytes
) -> None:
    # Java ignores TMPDIR: without its own java.io.tmpdir every TorchServe on the host puts its
    # first worker's socket at /tmp/.ts.sock.9000, and two instances steal each other's workers.
    stub.Predict(pb.PredictRequest(image=coffee_jpeg, model="imagenet"), timeout=60)
    assert list((torchserve.home / "tmp").glob(".ts.sock.*"))


def test_predict_explicit_version_and_top_k(
    stub: refit_pb2_grpc.RefitStub, cat_jpeg: bytes
) -> None:
    request = pb.PredictRequest(image=cat_jpeg, model="imagenet", version="1", top_k=3)
    answer = stub.Predict(request, timeout=30)
    assert len(answer.predictions) == 3
    assert 281 <= answer.predictions[0].index <= 285  # the ImageNet cats
    assert answer.version == "1"


def test_top_k_is_capped_at_class_count(stub: refit_pb2_grpc.RefitStub, cat_jpeg: bytes) -> None:
    answer = stub.Predict(pb.PredictRequest(image=cat_jpeg, model="imagenet", top_k=5000))
    assert len(answer.predictions) == 1000


@pytest.mark.parametrize(
    ("fields", "code", "fragment"),
    [
        ({"image": b"", "model": "imagenet"}, "INVALID_ARGUMENT", "empty"),
        ({"image": b"hello, not an image", "model": "imagenet"}, "INVALID_ARGUMENT", "not a"),
        ({"image": b"\xff\xd8\xff", "model": ""}, "INVALID_ARGUMENT", "model is required"),
        ({"image": b"x", "model": "Bad Name!"}, "INVALID_ARGUMENT", "invalid model name"),
    ],
)
def test_bad_requests(
    stub: refit_pb2_grpc.RefitStub, fields: dict, code: str, fragment: str
) -> None:
    error = predict_error(stub, **fields)
    assert error.code().name == code
    assert fragment in error.details()


def test_truncated_jpeg(stub: refit_pb2_grpc.RefitStub, coffee_jpeg: bytes) -> None:
    error = predict_error(stub, image=coffee_jpeg[: len(coffee_jpeg) // 2], model="imagenet")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "truncated" in error.details()


def test_truncated_bmp_is_caught_by_the_handler(stub: refit_pb2_grpc.RefitStub) -> None:
    bmp = encode(Image.new("RGB", (64, 64), "red"), "BMP")
    error = predict_error(stub, image=bmp[: len(bmp) // 2], model="imagenet")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "could not be decoded" in error.details()


def huge_png(width: int, height: int) -> bytes:
    """A tiny file that decodes to width x height pixels: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    rows = zlib.compress(b"\x00" * ((width + 7) // 8 + 1) * 64)  # only a few rows: never decoded
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )


def test_decompression_bomb(stub: refit_pb2_grpc.RefitStub) -> None:
    error = predict_error(stub, image=huge_png(30_000, 30_000), model="imagenet")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "decompression bomb" in error.details()


def test_payload_over_limit(stub: refit_pb2_grpc.RefitStub) -> None:
    too_big = b"\xff\xd8" + bytes(8 << 20)
    error = predict_error(stub, image=too_big, model="imagenet")
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "REFIT_MAX_IMAGE_BYTES" in error.details()


def test_unknown_model_and_version(stub: refit_pb2_grpc.RefitStub, cat_jpeg: bytes) -> None:
    error = predict_error(stub, image=cat_jpeg, model="nosuchmodel")
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "nosuchmodel" in error.details()
    error = predict_error(stub, image=cat_jpeg, model="imagenet", version="42")
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "42" in error.details()


def test_client_deadline(stub: refit_pb2_grpc.RefitStub, coffee_jpeg: bytes) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(pb.PredictRequest(image=coffee_jpeg, model="imagenet"), timeout=0.001)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_upstream_deadline(moto_server, refit_bucket, torchserve, coffee_jpeg) -> None:
    settings = service_settings(moto_server, refit_bucket, torchserve, upstream_timeout_s=1e-4)
    refit = start_service(settings, wait_ready=False)
    try:
        with connect(refit.port) as channel:
            stub = refit_pb2_grpc.RefitStub(channel)
            error = predict_error(stub, image=coffee_jpeg, model="imagenet")
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # Past the deadline before TorchServe was asked, or while it was: both name the version.
        assert "imagenet v1" in error.details(), error.details()
    finally:
        refit.stop()


def test_torchserve_unreachable(moto_server, refit_bucket, coffee_jpeg) -> None:
    from local_stack.torchserve import TorchServePorts
    from tests.conftest import free_port

    dead = TorchServePorts(*(free_port() for _ in range(5)))
    refit = start_service(service_settings(moto_server, refit_bucket, dead), wait_ready=False)
    try:
        with connect(refit.port) as channel:
            stub = refit_pb2_grpc.RefitStub(channel)
            error = predict_error(stub, image=coffee_jpeg, model="imagenet")
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert "unreachable" in error.details()
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        refit.stop()


def test_predict_stream_keeps_ids_and_order(
    stub: refit_pb2_grpc.RefitStub, coffee_jpeg: bytes, cat_jpeg: bytes
) -> None:
    images = [coffee_jpeg if i % 2 else cat_jpeg for i in range(50)]
    images[17] = b"broken"
    requests = [
        pb.PredictRequest(image=img, model="imagenet", top_k=2, request_id=f"r{i}")
        for i, img in enumerate(images)
    ]
    answers = list(stub.PredictStream(iter(requests), timeout=120))
    assert [a.request_id for a in answers] == [f"r{i}" for i in range(50)]
    assert answers[17].error.code == "INVALID_ARGUMENT" and not answers[17].predictions
    for i, answer in enumerate(answers):
        if i == 17:
            continue
        assert not answer.error.code and len(answer.predictions) == 2
        if i % 2:
            assert COFFEE_LABELS & {p.label for p in answer.predictions}
        else:
            assert 281 <= answer.predictions[0].index <= 285


def test_predict_stream_ping_pong(stub: refit_pb2_grpc.RefitStub, cat_jpeg: bytes) -> None:
    """A client that waits for each answer before sending the next request is served."""
    import queue

    outbox: queue.Queue = queue.Queue()
    stream = stub.PredictStream(iter(outbox.get, None), timeout=60)
    for i in range(3):
        outbox.put(pb.PredictRequest(image=cat_jpeg, model="imagenet", request_id=str(i)))
        assert next(stream).request_id == str(i)
    outbox.put(None)
    assert list(stream) == []


def test_list_and_get_model(stub: refit_pb2_grpc.RefitStub) -> None:
    listing = stub.ListModels(pb.ListModelsRequest())
    assert "imagenet" in [m.name for m in listing.models]
    model = stub.GetModel(pb.GetModelRequest(name="imagenet"))
    assert model.default_version == "1"
    (version,) = model.versions
    assert version.is_default and version.state == "serving"
    assert len(version.class_names) == 1000 and version.class_names[967] == "espresso"
    assert version.lineage.backbone == "efficientnet_lite0"
    assert version.created_at.seconds > 0
    assert version.archive_key.startswith("archives/imagenet/")


def test_get_unknown_model(stub: refit_pb2_grpc.RefitStub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetModel(pb.GetModelRequest(name="nosuchmodel"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_and_reflection(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "refit.v1.Refit"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (answer,) = reflection.ServerReflectionInfo(iter([request]))
    names = {s.name for s in answer.list_services_response.service}
    assert {"refit.v1.Refit", "grpc.health.v1.Health"} <= names


def test_metrics_count_rpcs_by_code(stub: refit_pb2_grpc.RefitStub, cat_jpeg: bytes) -> None:
    def count(code: str) -> float:
        labels = {"method": "Predict", "code": code}
        return REGISTRY.get_sample_value("refit_rpc_requests_total", labels) or 0.0

    ok, invalid = count("OK"), count("INVALID_ARGUMENT")
    stub.Predict(pb.PredictRequest(image=cat_jpeg, model="imagenet"))
    predict_error(stub, image=b"", model="imagenet")
    # Counted as the call ends, which the client may see a moment before.
    wait_until(lambda: count("OK") == ok + 1, 5, "the OK call counted")
    wait_until(lambda: count("INVALID_ARGUMENT") == invalid + 1, 5, "the refused call counted")
    assert REGISTRY.get_sample_value("refit_rpc_latency_seconds_count", {"method": "Predict"})
    assert REGISTRY.get_sample_value(
        "refit_predictions_total", {"model": "imagenet", "version": "1"}
    )
    assert REGISTRY.get_sample_value("refit_upstream_latency_seconds_count", {"call": "predict"})
    assert (
        REGISTRY.get_sample_value(
            "refit_model_default_version_info", {"model": "imagenet", "version": "1"}
        )
        == 1
    )


def test_image_sizes_are_observed_per_method(
    stub: refit_pb2_grpc.RefitStub, cat_jpeg: bytes
) -> None:
    """The dashboard's payload panel reads refit_request_payload_bytes (it was never observed)."""

    def observed(method: str) -> tuple[float, float]:
        labels = {"method": method}
        count = REGISTRY.get_sample_value("refit_request_payload_bytes_count", labels) or 0.0
        return count, REGISTRY.get_sample_value("refit_request_payload_bytes_sum", labels) or 0.0

    before = {m: observed(m) for m in ("Predict", "PredictStream")}
    stub.Predict(pb.PredictRequest(image=cat_jpeg, model="imagenet"))
    requests = [pb.PredictRequest(image=cat_jpeg, model="imagenet", request_id=str(i))
                for i in range(2)]  # fmt: skip
    assert len(list(stub.PredictStream(iter(requests)))) == 2
    for method, images in (("Predict", 1), ("PredictStream", 2)):
        count, total = observed(method)
        assert count == before[method][0] + images, method
        assert total == before[method][1] + images * len(cat_jpeg), method


def test_torchserve_restart_is_reconciled(
    stub: refit_pb2_grpc.RefitStub, torchserve, refit_service, cat_jpeg
) -> None:
    from tests.service.conftest import wait_serving

    torchserve.stop()
    error = predict_error(stub, image=cat_jpeg, model="imagenet")
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    torchserve.start()
    wait_serving(refit_service.port)  # the reconciler re-registered imagenet v1 and its default
    answer = stub.Predict(pb.PredictRequest(image=cat_jpeg, model="imagenet"), timeout=30)
    assert answer.version == "1" and 281 <= answer.predictions[0].index <= 285
