"""The Open Inference Protocol code generated from the pinned kserve wheel (make gen)."""

from __future__ import annotations

import pytest

from proto.generate import serialized_descriptor
from refit.inference_api import grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc

# The wire names stock clients (tritonclient, KServe's InferenceGRPCClient) call.
CLIENT_METHODS = {
    "ServerLive",
    "ServerReady",
    "ServerMetadata",
    "ModelReady",
    "ModelMetadata",
    "ModelInfer",
}


def test_generated_service_has_the_names_stock_clients_call() -> None:
    service = grpc_predict_v2_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert {m.name for m in service.methods} >= CLIENT_METHODS
    assert hasattr(grpc_predict_v2_pb2_grpc, "add_GRPCInferenceServiceServicer_to_server")


def test_serialized_descriptor_reads_the_literal_without_running_the_module() -> None:
    source = "import os\nDESCRIPTOR = pool.Default().AddSerializedFile(b'\\x0a\\x01x')\nos.exit()\n"
    assert serialized_descriptor(source) == b"\n\x01x"


def test_serialized_descriptor_missing_stops_generation() -> None:
    with pytest.raises(SystemExit, match="no serialized descriptor"):
        serialized_descriptor("DESCRIPTOR = None\n")
