"""What a trained version serves: its ONNX export, checked against the eager model on the
version's validation images, and its int8 model when that costs no accuracy (precision.py).

One pass over the validation split runs the eager model, the fp32 ONNX model and the int8 one on
the same images: the export check compares the first two, the precision gate the last two's
accuracies. int8 is calibrated on up to ``CALIBRATION_IMAGES`` of the version's training images,
through the evaluation transform, as they would be served."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from trainer.onnx_export import (
    Agreement,
    batches,
    eager_probabilities,
    export_onnx,
    probabilities,
    session,
)
from trainer.package import ONNX, ExportedModel
from trainer.precision import AUTO, INT8, Comparison, PrecisionChoice, choose_precision
from trainer.quantize import CALIBRATION_IMAGES, quantize_int8

# fp32 ONNX against the eager model: the benchmark's target is top-1 within 0.05 points of the
# eager/TorchScript model; ONNX Runtime's fp32 differs from eager torch by float reordering only
# (about 1e-6 in probability), so a larger gap means a broken export.
EXPORT_MIN_TOP1_AGREEMENT = 0.9995
EXPORT_MAX_PROBABILITY_DIFF = 1e-4
CHECK_BATCH = 32


class ExportMismatch(RuntimeError):
    pass


@dataclass(frozen=True)
class ServingModel:
    exported: ExportedModel
    choice: PrecisionChoice
    export_check: dict  # Agreement.as_dict() of fp32 ONNX vs eager
    seconds: dict[str, float] = field(default_factory=dict)  # export, quantize, check


def prepare_serving_model(
    model: torch.nn.Module,
    crop_size: int,
    work: Path,
    *,
    val: Iterable | None,
    train: Iterable | None,
    precision: str = AUTO,
    int8_max_drop_points: float = 0.3,
) -> ServingModel:
    """Export ``model``, quantize it unless fp32 is asked for, check and choose.

    ``val`` and ``train`` yield (image tensor, label) through the evaluation transform; without
    validation images the export is checked on the calibration images and stays fp32."""
    model = model.eval().cpu()
    work.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    fp32_path = export_onnx(model, crop_size, work / "model.onnx")
    seconds["export"] = time.perf_counter() - started
    calibration = [x for x, _ in batches(train or [], CHECK_BATCH, CALIBRATION_IMAGES)]
    int8_path = None
    if precision == AUTO and calibration:
        started = time.perf_counter()
        int8_path = quantize_int8(fp32_path, calibration, work / "model.int8.onnx")
        seconds["quantize"] = time.perf_counter() - started
    started = time.perf_counter()
    fp32 = session(fp32_path)
    int8 = session(int8_path) if int8_path is not None else None
    agreement, scores = Agreement(), np.zeros(4, dtype=np.int64)  # images, right: fp32, int8, one
    for images, labels in batches(val or [], CHECK_BATCH):
        fp32_probs = probabilities(fp32, images)
        agreement.add(eager_probabilities(model, torch.from_numpy(images)), fp32_probs)
        fp32_right = fp32_probs.argmax(1) == labels
        int8_right = (
            probabilities(int8, images).argmax(1) == labels if int8 is not None else fp32_right
        )
        scores += [
            len(labels),
            fp32_right.sum(),
            int8_right.sum(),
            (fp32_right != int8_right).sum(),
        ]
    if not agreement.images:  # no validation split: the calibration images, unlabelled
        for images in calibration:
            agreement.add(eager_probabilities(model, torch.from_numpy(images)),
                          probabilities(fp32, images))  # fmt: skip
    seconds["check"] = time.perf_counter() - started
    if not agreement.within(EXPORT_MIN_TOP1_AGREEMENT, EXPORT_MAX_PROBABILITY_DIFF):
        raise ExportMismatch(f"the ONNX export differs from the trained model: "
                             f"{agreement.as_dict()}")  # fmt: skip
    images, fp32_correct, int8_correct, discordant = (int(n) for n in scores)
    fp32_accuracy = fp32_correct / images if images else None
    compared = (
        Comparison(images, fp32_correct, int8_correct, discordant) if int8 is not None else None
    )
    choice = choose_precision(precision, fp32_accuracy, compared, int8_max_drop_points)
    served = int8_path if choice.precision == INT8 and int8_path is not None else fp32_path
    return ServingModel(ExportedModel(served, ONNX, choice.precision), choice,
                        agreement.as_dict(), seconds)  # fmt: skip
