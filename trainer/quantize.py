"""Static int8 quantization of an exported ONNX model, calibrated on the version's own training
images (through the evaluation transform, as served). QDQ format, per-channel weights, after
ONNX Runtime's pre-processing (shape inference, folding); docs/benchmarks.md has its speed.
Whether it is served is the publisher's call (trainer/precision.py)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from trainer.onnx_export import INPUT

CALIBRATION_IMAGES = 256  # a bounded sample: min/max calibration settles within a few hundred


class _Reader(CalibrationDataReader):
    def __init__(self, batches: Iterable[np.ndarray]) -> None:
        self._batches: Iterator[np.ndarray] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT: batch.astype(np.float32)}


def quantize_int8(fp32: Path, calibration: Iterable[np.ndarray], out: Path) -> Path:
    """Write the int8 model of ``fp32`` to ``out``, calibrated on ``calibration`` batches."""
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared), str(out), _Reader(calibration),
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        )  # fmt: skip
    return out
