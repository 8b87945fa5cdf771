"""One stack serves both archive kinds side by side (issue 25): `imagenet` v1 as refit publishes
it now (ONNX, run by ONNX Runtime inside TorchServe) and v2, the same weights packaged as
archives were before (TorchScript, its own handler), through the real service and TorchServe."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from local_stack.torchserve import TorchServeProcess
from refit.registry import Registry, VersionRecord
from refit.v1 import refit_pb2 as pb
from refit.v1 import refit_pb2_grpc
from service.server import RefitServer
from tests.conftest import MotoServer
from tests.service.conftest import (
    bucket_with_imagenet_archive,
    connect,
    service_settings,
    start_service,
)

pytestmark = pytest.mark.integration
SCORE_TOLERANCE = 0.02  # preprocessing differs by one 8-bit level at most (no draft: < 512 px)


@pytest.fixture(scope="module")
def both_kinds(moto_server: MotoServer, refit_bucket: str) -> str:
    from trainer.backbones import efficientnet_lite0_imagenet
    from trainer.package import build_archive
    from trainer.preprocessing import Preprocessing

    store, name, source = bucket_with_imagenet_archive(moto_server, refit_bucket, "runtimes")
    registry = Registry(store, name)
    registry.add(source)
    with tempfile.TemporaryDirectory() as tmp:
        archive = build_archive(
            efficientnet_lite0_imagenet(),
            model_name="imagenet",
            version="2",
            class_names=source.class_names,
            preprocessing=Preprocessing(),
            metadata={"backbone": "efficientnet_lite0"},
            out_dir=Path(tmp),
            runtime="torchscript",
        )
        key = Registry.archive_key("imagenet", archive.digest)
        store.put_file(name, key, archive.path)
    registry.add(VersionRecord("imagenet", "2", key, source.class_names))
    registry.set_default("imagenet", "1")
    return name


@pytest.fixture(scope="module")
def api(
    moto_server: MotoServer, both_kinds: str, torchserve: TorchServeProcess
) -> Iterator[refit_pb2_grpc.RefitStub]:
    refit: RefitServer = start_service(service_settings(moto_server, both_kinds, torchserve))
    try:
        with connect(refit.port) as channel:
            yield refit_pb2_grpc.RefitStub(channel)
    finally:
        refit.stop()


def test_onnx_and_torchscript_versions_answer_alike(api, coffee_jpeg, cat_jpeg) -> None:
    for image in (coffee_jpeg, cat_jpeg):
        onnx, torchscript = (
            api.Predict(
                pb.PredictRequest(image=image, model="imagenet", version=v, top_k=3), timeout=60
            )
            for v in ("1", "2")
        )
        assert (onnx.version, torchscript.version) == ("1", "2")
        assert onnx.predictions[0].index == torchscript.predictions[0].index
        assert onnx.predictions[0].score == pytest.approx(
            torchscript.predictions[0].score, abs=SCORE_TOLERANCE
        )
    assert onnx.predictions[0].label == torchscript.predictions[0].label


def test_get_model_shows_each_versions_precision(api) -> None:
    versions = {v.version: v for v in api.GetModel(pb.GetModelRequest(name="imagenet")).versions}
    base = versions["1"]  # no validation split: fp32, nothing measured
    assert base.precision == pb.PRECISION_FP32 and not base.HasField("fp32_accuracy")
    assert versions["2"].precision == pb.PRECISION_FP32  # recorded before precisions existed
