"""The ONNX handler in a fake TorchServe context, with a real ONNX Runtime session of a stand-in
model: the same answers, row by row, as the TorchScript handler (tests/trainer/serving/
test_handler.py), and its thread and provider choices."""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from tests.conftest import encode
from tests.trainer.serving.test_handler import COLOURS, decompression_bomb
from tests.trainer.serving.test_handler import answers as torchscript_answers
from trainer.onnx_export import export_onnx
from trainer.preprocessing import Preprocessing
from trainer.serving import onnx_handler
from trainer.serving.onnx_handler import RefitOnnxClassifier, intra_op_threads, providers

PRE = Preprocessing(resize_size=8, crop_size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


class ChannelMeans(torch.nn.Module):
    """Class i scores the mean of channel i: a red image is "red", a blue one "blue"."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return 20 * images.mean(dim=(2, 3))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("onnx-model")
    export_onnx(ChannelMeans(), PRE.crop_size, folder / "model.onnx")
    meta = {"class_names": list(COLOURS), **asdict(PRE), "runtime": "onnx", "precision": "fp32"}
    (folder / "refit.json").write_text(json.dumps(meta))
    return folder


def context(model_dir: Path, **yaml: object) -> SimpleNamespace:
    return SimpleNamespace(
        system_properties={"model_dir": str(model_dir), "gpu_id": None},
        manifest={"model": {"serializedFile": "model.onnx"}},
        model_yaml_config=yaml,
    )


@pytest.fixture(scope="module")
def handler(model_dir: Path) -> RefitOnnxClassifier:
    h = RefitOnnxClassifier()
    h.initialize(context(model_dir))
    return h


def image(colour: str) -> bytes:
    return encode(Image.new("RGB", (8, 8), COLOURS[colour]), "PNG")


def answers(h: RefitOnnxClassifier, rows: list[dict]) -> list[dict]:
    return [json.loads(a) for a in h.postprocess(h.inference(h.preprocess(rows)))]


def test_each_row_gets_its_own_answer(handler: RefitOnnxClassifier) -> None:
    rows = [{"data": image("red"), "top_k": b"1"}, {"data": image("blue"), "top_k": b"2"}]
    first, second = answers(handler, rows)
    assert [p["label"] for p in first["predictions"]] == ["red"]
    assert [p["label"] for p in second["predictions"]][:1] == ["blue"]
    assert len(second["predictions"]) == 2


def test_bad_rows_fail_alone_as_in_the_torchscript_handler(handler) -> None:
    rows = [
        {"data": image("red"), "top_k": b"many"},
        {"data": image("blue"), "top_k": b"1"},
        {"data": b"not an image", "top_k": b"1"},
        {"data": decompression_bomb(), "top_k": b"1"},
        {"data": encode(Image.new("RGB", (1, 30_000)), "PNG"), "top_k": b"1"},
        {"data": b"", "top_k": b"1"},
        {"data": image("green"), "top_k": b"9"},
        {"body": image("green")},
    ]
    onnx, torchscript = answers(handler, rows), torchscript_answers(rows)
    assert [set(a) for a in onnx] == [set(a) for a in torchscript]
    for ours, theirs in zip(onnx, torchscript, strict=True):
        if "error" in ours:  # the same words, bar object addresses
            assert re.sub("0x[0-9a-f]+", "", ours["error"]) == re.sub(
                "0x[0-9a-f]+", "", theirs["error"]
            )
        else:
            assert [p["label"] for p in ours["predictions"]] == [
                p["label"] for p in theirs["predictions"]
            ]
            for p, q in zip(ours["predictions"], theirs["predictions"], strict=True):
                assert p["score"] == pytest.approx(q["score"], abs=1e-5)


def test_a_batch_without_a_good_image_answers_every_row(handler) -> None:
    bad = answers(handler, [{"data": b"x", "top_k": b"1"}, {"data": image("red"), "top_k": "z"}])
    assert all("error" in a for a in bad)


def test_threads_share_the_usable_cores_between_the_models_workers(monkeypatch) -> None:
    monkeypatch.setattr(onnx_handler, "usable_cores", lambda: 8)
    assert intra_op_threads(1, env={}) == 8
    assert intra_op_threads(3, env={}) == 2
    assert intra_op_threads(16, env={}) == 1
    assert intra_op_threads(1, env={"REFIT_ORT_THREADS": "3"}) == 3
    assert onnx_handler.workers_of(context(Path("."), minWorkers=4)) == 4
    assert onnx_handler.workers_of(SimpleNamespace()) == 1


def test_the_handler_runs_on_a_gpu_only_when_given_one_and_able(monkeypatch) -> None:
    assert providers({"gpu_id": None}) == ["CPUExecutionProvider"]
    monkeypatch.setattr(
        onnx_handler.ort, "get_available_providers", lambda: ["CPUExecutionProvider"]
    )
    assert providers({"gpu_id": 0}) == ["CPUExecutionProvider"]
    cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnx_handler.ort, "get_available_providers", lambda: cuda)
    first, fallback = providers({"gpu_id": 1})
    assert first == ("CUDAExecutionProvider", {"device_id": 1})
    assert fallback == "CPUExecutionProvider"


def test_the_handler_module_defines_one_class() -> None:
    """TorchServe refuses to start workers for a handler module with more than one class."""
    defined = [
        value
        for value in vars(onnx_handler).values()
        if inspect.isclass(value) and value.__module__ == onnx_handler.__name__
    ]
    assert defined == [RefitOnnxClassifier]
