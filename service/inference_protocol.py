"""Open Inference Protocol (KServe v2 / Triton gRPC) tensors <-> refit's Predict domain calls.

One request input: a BYTES tensor of encoded images, shape [batch] or [batch, 1]. Outputs, each
[batch, k]: `labels` (BYTES), `scores` (FP32), `class_indices` (INT64). Optional request
parameter `top_k` (int64). Stock clients send BYTES either as `contents.bytes_contents` (KServe)
or in `raw_input_contents`, each element prefixed by its uint32 little-endian length (Triton).
"""

from __future__ import annotations

import struct

import grpc

from refit.errors import InvalidArgument
from refit.inference_api import grpc_predict_v2_pb2 as oip
from refit.inference_api import grpc_predict_v2_pb2_grpc as oip_grpc
from service.catalog import ModelCatalog
from service.predictions import Predictor, PredictResult

SERVICE_NAME = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
PLATFORM = "refit_torchserve"
Metadata = oip.ModelMetadataResponse.TensorMetadata
INPUTS = [Metadata(name="images", datatype="BYTES", shape=[-1])]
OUTPUTS = [
    Metadata(name="labels", datatype="BYTES", shape=[-1, -1]),
    Metadata(name="scores", datatype="FP32", shape=[-1, -1]),
    Metadata(name="class_indices", datatype="INT64", shape=[-1, -1]),
]

_LENGTH = struct.Struct("<I")


def request_images(request: oip.ModelInferRequest) -> list[bytes]:
    """The images of the request's single BYTES input, checked against its declared shape."""
    if len(request.inputs) != 1:
        raise InvalidArgument(f"expected 1 input tensor of images, got {len(request.inputs)}")
    tensor = request.inputs[0]
    if tensor.datatype != "BYTES":
        raise InvalidArgument(
            f"input '{tensor.name}': datatype must be BYTES, not {tensor.datatype}"
        )
    shape = list(tensor.shape)
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or shape[0] < 1:
        raise InvalidArgument(
            f"input '{tensor.name}': shape must be [batch] or [batch, 1], batch >= 1, got {shape}"
        )
    if request.raw_input_contents:
        images = _split_raw(tensor.name, request.raw_input_contents[0])
    else:
        images = list(tensor.contents.bytes_contents)
    if len(images) != shape[0]:
        raise InvalidArgument(f"input '{tensor.name}': shape {shape} but {len(images)} elements")
    if not all(images):
        raise InvalidArgument(f"input '{tensor.name}': an image element is empty")
    return images


def _split_raw(name: str, raw: bytes) -> list[bytes]:
    elements, offset = [], 0
    while offset < len(raw):
        if offset + _LENGTH.size > len(raw):
            raise InvalidArgument(f"input '{name}': raw contents end inside a length prefix")
        (size,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if offset + size > len(raw):
            raise InvalidArgument(f"input '{name}': raw element runs past the end of the contents")
        elements.append(raw[offset : offset + size])
        offset += size
    return elements


def request_top_k(request: oip.ModelInferRequest) -> int:
    """The `top_k` parameter; 0 (absent) means refit's Predict default."""
    if "top_k" not in request.parameters:
        return 0
    value = request.parameters["top_k"]
    if value.WhichOneof("parameter_choice") != "int64_param" or value.int64_param < 1:
        raise InvalidArgument("parameter 'top_k' must be an int64 >= 1")
    return value.int64_param


def infer_response(
    request: oip.ModelInferRequest, results: list[PredictResult]
) -> oip.ModelInferResponse:
    """Outputs [batch, k] in `raw_output_contents` (little-endian, BYTES length-prefixed), the
    form Triton's servers send: tritonclient cannot read typed BYTES contents under numpy 2."""
    shape = [len(results), len(results[0].predictions)]
    found = [p for result in results for p in result.predictions]
    raw = [
        b"".join(_LENGTH.pack(len(p.label.encode())) + p.label.encode() for p in found),
        struct.pack(f"<{len(found)}f", *(p.score for p in found)),
        struct.pack(f"<{len(found)}q", *(p.index for p in found)),
    ]
    Output = oip.ModelInferResponse.InferOutputTensor
    return oip.ModelInferResponse(
        model_name=request.model_name,
        model_version=results[0].version,
        id=request.id,
        outputs=[Output(name=m.name, datatype=m.datatype, shape=shape) for m in OUTPUTS],
        raw_output_contents=raw,
    )


class InferenceProtocolServicer(oip_grpc.GRPCInferenceServiceServicer):
    """Each image of a ModelInfer is one refit Predict, through the same Predictor."""

    def __init__(self, predictor: Predictor, catalog: ModelCatalog) -> None:
        self.predictor = predictor
        self.catalog = catalog

    def ServerLive(self, request: oip.ServerLiveRequest, context: grpc.ServicerContext):
        return oip.ServerLiveResponse(live=True)

    def ServerReady(self, request: oip.ServerReadyRequest, context: grpc.ServicerContext):
        return oip.ServerReadyResponse(ready=bool(self.catalog.models()))

    def ServerMetadata(self, request: oip.ServerMetadataRequest, context: grpc.ServicerContext):
        return oip.ServerMetadataResponse(name="refit", version="v1")

    def ModelReady(self, request: oip.ModelReadyRequest, context: grpc.ServicerContext):
        self.catalog.resolve(request.name, request.version, wait_s=context.time_remaining())
        return oip.ModelReadyResponse(ready=True)

    def ModelMetadata(self, request: oip.ModelMetadataRequest, context: grpc.ServicerContext):
        entry = self.catalog.get(request.name, wait_s=context.time_remaining())
        if request.version:
            entry.version(request.version)
        return oip.ModelMetadataResponse(
            name=entry.name,
            versions=[r.version for r in entry.versions],
            platform=PLATFORM,
            inputs=INPUTS,
            outputs=OUTPUTS,
        )

    def ModelInfer(self, request: oip.ModelInferRequest, context: grpc.ServicerContext):
        images, k = request_images(request), request_top_k(request)
        results = [
            self.predictor.predict(
                image, request.model_name, request.model_version, k, context.time_remaining()
            )
            for image in images
        ]
        return infer_response(request, results)
