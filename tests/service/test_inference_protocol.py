"""The Open Inference Protocol (service/inference_protocol.py): tensor conversion in-process,
then over real gRPC on the service's port against a real TorchServe."""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import grpc
import pytest

from refit.errors import InvalidArgument
from refit.inference_api import grpc_predict_v2_pb2 as oip
from refit.inference_api import grpc_predict_v2_pb2_grpc as oip_grpc
from refit.v1 import refit_pb2 as pb
from refit.v1 import refit_pb2_grpc
from service.inference_protocol import infer_response, request_images, request_top_k
from service.predictions import Prediction, PredictResult
from service.server import RefitServer
from tests.service.conftest import PREDICT_TOKEN, connect

Tensor = oip.ModelInferRequest.InferInputTensor
OIP_PYTHON = Path(".venv-oip/bin/python")
TRITON_SCRIPT = Path(__file__).parent / "oip_client" / "triton_infer.py"
KSERVE_SCRIPT = Path(__file__).parent / "oip_client" / "kserve_infer.py"


def raw(*elements: bytes) -> bytes:
    """Triton's BYTES wire form: each element prefixed by its uint32 little-endian length."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def bytes_request(
    shape: list[int], *images: bytes, datatype: str = "BYTES"
) -> oip.ModelInferRequest:
    tensor = Tensor(name="images", datatype=datatype, shape=shape)
    return oip.ModelInferRequest(model_name="m", inputs=[tensor], raw_input_contents=[raw(*images)])


def test_raw_contents_of_shape_batch_by_one_give_each_image() -> None:
    assert request_images(bytes_request([2, 1], b"jpeg1", b"png22")) == [b"jpeg1", b"png22"]


def test_typed_contents_give_each_image() -> None:
    tensor = Tensor(name="images", datatype="BYTES", shape=[2])
    tensor.contents.bytes_contents.extend([b"a", b"bb"])
    assert request_images(oip.ModelInferRequest(inputs=[tensor])) == [b"a", b"bb"]


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (bytes_request([1], b"x", datatype="FP32"), "datatype must be BYTES"),
        (bytes_request([1, 3], b"x"), "shape must be"),
        (bytes_request([0]), "shape must be"),
        (bytes_request([2], b"x"), "but 1 elements"),
        (bytes_request([1], b""), "empty"),
    ],
)
def test_bad_tensors_are_invalid_arguments_naming_the_tensor(
    request_: oip.ModelInferRequest, message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message) as caught:
        request_images(request_)
    assert "'images'" in caught.value.message


def test_truncated_raw_contents_are_invalid() -> None:
    request_ = bytes_request([1], b"abc")
    request_.raw_input_contents[0] = request_.raw_input_contents[0][:-1]
    with pytest.raises(InvalidArgument, match="past the end"):
        request_images(request_)


def test_top_k_absent_means_default_and_must_be_a_positive_int64() -> None:
    request_ = oip.ModelInferRequest()
    assert request_top_k(request_) == 0
    request_.parameters["top_k"].int64_param = 3
    assert request_top_k(request_) == 3
    request_.parameters["top_k"].string_param = "3"
    with pytest.raises(InvalidArgument, match="top_k"):
        request_top_k(request_)


def test_response_has_batch_by_k_outputs_in_image_order() -> None:
    first = PredictResult("m", "2", [Prediction("cat", 0.9, 281), Prediction("dog", 0.1, 207)])
    second = PredictResult("m", "2", [Prediction("cup", 0.7, 967), Prediction("mug", 0.2, 504)])
    response = infer_response(oip.ModelInferRequest(model_name="m", id="r1"), [first, second])
    labels, scores, indices = response.raw_output_contents
    assert (response.model_version, response.id) == ("2", "r1")
    assert [o.name for o in response.outputs] == ["labels", "scores", "class_indices"]
    assert all(list(o.shape) == [2, 2] for o in response.outputs)
    assert labels == raw(b"cat", b"dog", b"cup", b"mug")
    assert struct.unpack("<4f", scores) == pytest.approx([0.9, 0.1, 0.7, 0.2])
    assert struct.unpack("<4q", indices) == (281, 207, 967, 504)


@pytest.fixture(scope="module")
def oip_stub(refit_service: RefitServer) -> oip_grpc.GRPCInferenceServiceStub:
    """A predict-role client on the same port and tokens as refit's own API."""
    return oip_grpc.GRPCInferenceServiceStub(connect(refit_service.port, PREDICT_TOKEN))


def infer_error(stub: oip_grpc.GRPCInferenceServiceStub, request_: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request_, timeout=30)
    return caught.value


def test_server_and_model_readiness(oip_stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    assert oip_stub.ServerLive(oip.ServerLiveRequest(), timeout=30).live
    assert oip_stub.ServerReady(oip.ServerReadyRequest(), timeout=30).ready
    assert oip_stub.ModelReady(oip.ModelReadyRequest(name="imagenet"), timeout=30).ready
    metadata = oip_stub.ModelMetadata(oip.ModelMetadataRequest(name="imagenet"), timeout=30)
    assert "1" in metadata.versions
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("images", "BYTES", [-1])
    ]
    assert [t.name for t in metadata.outputs] == ["labels", "scores", "class_indices"]


def test_infer_two_images_matches_refit_predict(
    oip_stub: oip_grpc.GRPCInferenceServiceStub,
    stub: refit_pb2_grpc.RefitStub,
    coffee_jpeg: bytes,
    cat_jpeg: bytes,
) -> None:
    request_ = bytes_request([2, 1], coffee_jpeg, cat_jpeg)
    request_.model_name, request_.model_version = "imagenet", "1"
    request_.parameters["top_k"].int64_param = 3
    answer = oip_stub.ModelInfer(request_, timeout=60)
    assert list(answer.outputs[0].shape) == [2, 3] and answer.model_version == "1"
    own = stub.Predict(pb.PredictRequest(image=coffee_jpeg, model="imagenet", top_k=3), timeout=30)
    labels = [p.label.encode() for p in own.predictions]
    assert answer.raw_output_contents[0].startswith(raw(*labels))
    scores = struct.unpack("<3f", answer.raw_output_contents[1][:12])
    assert scores == pytest.approx([p.score for p in own.predictions])


def test_bad_tensor_over_grpc_names_it(oip_stub: oip_grpc.GRPCInferenceServiceStub) -> None:
    request_ = bytes_request([1], b"x", datatype="FP32")
    request_.model_name = "imagenet"
    error = infer_error(oip_stub, request_)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "'images'" in error.details()


def test_unknown_model_is_not_found(
    oip_stub: oip_grpc.GRPCInferenceServiceStub, coffee_jpeg: bytes
) -> None:
    request_ = bytes_request([1], coffee_jpeg)
    request_.model_name = "no-such-model"
    assert infer_error(oip_stub, request_).code() == grpc.StatusCode.NOT_FOUND


def test_no_token_is_unauthenticated(refit_service: RefitServer, coffee_jpeg: bytes) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{refit_service.port}") as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        error = infer_error(stub, bytes_request([1], coffee_jpeg))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


def triton_infer(port: int, token: str, *images: Path, script: Path = TRITON_SCRIPT) -> dict:
    """A stock client (tritonclient's, or KServe's), in its own venv (it pins protobuf < 7)."""
    assert OIP_PYTHON.exists(), f"{OIP_PYTHON} is missing: `make install` creates it"
    args = [str(OIP_PYTHON), str(script), f"127.0.0.1:{port}", token, "imagenet"]
    done = subprocess.run([*args, *map(str, images)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_stock_tritonclient_infers_with_a_token(
    refit_service: RefitServer, coffee_jpeg: bytes, cat_jpeg: bytes, tmp_path: Path
) -> None:
    coffee, cat = tmp_path / "coffee.jpg", tmp_path / "cat.jpg"
    coffee.write_bytes(coffee_jpeg)
    cat.write_bytes(cat_jpeg)
    answer = triton_infer(refit_service.port, PREDICT_TOKEN, coffee, cat)
    assert answer["live"] and len(answer["labels"]) == 2 and len(answer["labels"][0]) == 3
    inputs, outputs = answer["metadata"]["inputs"], answer["metadata"]["outputs"]
    assert [(t["name"], t["datatype"]) for t in inputs] == [("images", "BYTES")], inputs
    assert [t["name"] for t in outputs] == ["labels", "scores", "class_indices"], outputs
    assert {"espresso", "cup", "coffee mug"} & set(answer["labels"][0]), answer
    without = triton_infer(refit_service.port, "", coffee)
    assert without["error"] == "StatusCode.UNAUTHENTICATED", without


def test_kserve_inference_grpc_client_infers_with_a_token(
    refit_service: RefitServer, coffee_jpeg: bytes, cat_jpeg: bytes, tmp_path: Path
) -> None:
    coffee, cat = tmp_path / "coffee.jpg", tmp_path / "cat.jpg"
    coffee.write_bytes(coffee_jpeg)
    cat.write_bytes(cat_jpeg)
    answer = triton_infer(refit_service.port, PREDICT_TOKEN, coffee, cat, script=KSERVE_SCRIPT)
    assert [len(row) for row in answer["labels"]] == [3, 3], answer
    assert {"espresso", "cup", "coffee mug"} & set(answer["labels"][0]), answer
    assert len(answer["class_indices"][1]) == 3 and answer["scores"][0][0] > 0, answer
