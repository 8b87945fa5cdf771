"""What a trained version serves: the ONNX export checked against the eager model on the
version's validation images (top-1 agreement >= 99.95% on non-tied images, probabilities within
1e-4), int8 calibrated on its training images and served only through the accuracy gate."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch

from trainer import serving_model
from trainer.onnx_export import export_onnx
from trainer.precision import AUTO, FP32
from trainer.serving_model import ExportMismatch, prepare_serving_model

SIZE, CLASSES = 16, 3


def small_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, CLASSES),
    )
    return net.eval()


def split(images: int, seed: int) -> list[tuple[torch.Tensor, int]]:
    """Images whose class is the brightest channel, normalized-looking."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(images):
        image = torch.rand(3, SIZE, SIZE, generator=generator) * 2 - 1
        image[i % CLASSES] += 1.5
        rows.append((image, i % CLASSES))
    return rows


def test_an_exported_version_is_checked_on_the_validation_images(tmp_path: Path) -> None:
    served = prepare_serving_model(
        small_net(), SIZE, tmp_path, val=split(60, 1), train=split(40, 2), precision=AUTO
    )
    check = served.export_check
    assert check["images"] == 60 and check["top1_agreement"] == 1.0
    assert check["max_probability_diff"] <= serving_model.EXPORT_MAX_PROBABILITY_DIFF
    choice = served.choice
    assert choice.fp32_accuracy is not None and choice.int8_accuracy is not None
    assert "int8 costs" in choice.reason  # the gate judged the two on the same images
    assert served.exported.precision == choice.precision
    assert served.exported.path.name == f"model{'.int8' if choice.precision == 'int8' else ''}.onnx"
    ops = {node.op_type for node in onnx.load(str(tmp_path / "model.int8.onnx")).graph.node}
    assert "QuantizeLinear" in ops  # the int8 model was built and measured either way
    assert {"export", "quantize", "check"} <= set(served.seconds)


def test_a_lenient_gate_serves_int8_and_a_strict_one_fp32(tmp_path: Path) -> None:
    common = {"val": split(60, 1), "train": split(40, 2)}
    lenient = prepare_serving_model(
        small_net(), SIZE, tmp_path / "a", int8_max_drop_points=100.0, **common
    )
    assert lenient.exported.precision == "int8"
    assert lenient.exported.path.name == "model.int8.onnx"
    fp32 = prepare_serving_model(small_net(), SIZE, tmp_path / "b", precision=FP32, **common)
    assert fp32.exported.precision == FP32 and fp32.choice.int8_accuracy is None
    assert not (tmp_path / "b" / "model.int8.onnx").exists()  # not even quantized


def test_without_a_validation_split_the_version_stays_fp32(tmp_path: Path) -> None:
    served = prepare_serving_model(small_net(), SIZE, tmp_path, val=None, train=split(20, 2))
    assert served.exported.precision == FP32 and served.choice.fp32_accuracy is None
    assert served.export_check["images"] == 20  # checked on the calibration images


def test_an_export_that_differs_from_the_trained_model_fails(tmp_path, monkeypatch) -> None:
    def wrong_export(model, crop_size, path):
        return export_onnx(small_net(seed=7), crop_size, path)

    monkeypatch.setattr(serving_model, "export_onnx", wrong_export)
    with pytest.raises(ExportMismatch, match="differs from the trained model"):
        prepare_serving_model(small_net(), SIZE, tmp_path, val=split(30, 1), train=None)
