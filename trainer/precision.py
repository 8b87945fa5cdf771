"""Which precision a version is served at: int8 only when it costs no accuracy.

The publisher scores the fp32 and int8 models on the same validation images. int8 is served when
its accuracy drop, plus one standard error of that paired difference, is at most
``max_drop_points`` percentage points, unless fp32 was asked for. The standard error counts: on
Fashion-MNIST (100 images per class) int8 scored exactly fp32's 87.2% on the 500 validation
images, and 0.37 points less on the 10,000 test images (docs/benchmarks.md, *Serving format*).
Without a validation split nothing can be measured, so the version stays fp32."""

from __future__ import annotations

import math
from dataclasses import dataclass

FP32, INT8 = "fp32", "int8"
AUTO = "auto"  # what a request asks for by default: int8 when the gate allows it
DEFAULT_INT8_MAX_DROP_POINTS = 0.3


@dataclass(frozen=True)
class Comparison:
    """fp32 and int8 scored on the same labelled images."""

    images: int
    fp32_correct: int
    int8_correct: int
    discordant: int  # images exactly one of the two classifies right

    @property
    def fp32_accuracy(self) -> float:
        return self.fp32_correct / self.images

    @property
    def int8_accuracy(self) -> float:
        return self.int8_correct / self.images

    @property
    def drop_points(self) -> float:
        return 100 * (self.fp32_correct - self.int8_correct) / self.images

    @property
    def standard_error_points(self) -> float:
        """Of the paired difference (McNemar's): only the discordant images carry it."""
        return 100 * math.sqrt(self.discordant) / self.images


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str  # FP32 or INT8: the one served
    fp32_accuracy: float | None  # on the validation split; None: not measured
    int8_accuracy: float | None
    reason: str

    def as_dict(self) -> dict:
        return {"precision": self.precision, "fp32_accuracy": self.fp32_accuracy,
                "int8_accuracy": self.int8_accuracy, "reason": self.reason}  # fmt: skip


def choose_precision(
    requested: str,
    fp32_accuracy: float | None,
    comparison: Comparison | None,
    max_drop_points: float = DEFAULT_INT8_MAX_DROP_POINTS,
) -> PrecisionChoice:
    """int8 iff it was not refused and drop + one standard error <= ``max_drop_points``."""
    if requested not in (AUTO, FP32):
        raise ValueError(f"precision must be {AUTO!r} or {FP32!r}, got {requested!r}")
    if comparison is not None and comparison.images > 0:
        fp32_accuracy = comparison.fp32_accuracy
    int8_accuracy = comparison.int8_accuracy if comparison and comparison.images else None

    def choice(precision: str, reason: str) -> PrecisionChoice:
        return PrecisionChoice(precision, fp32_accuracy, int8_accuracy, reason)

    if requested == FP32:
        return choice(FP32, "fp32 was asked for")
    if comparison is None or comparison.images == 0:
        return choice(FP32, "no validation images to compare fp32 and int8 on")
    drop, error = comparison.drop_points, comparison.standard_error_points
    cost = f"int8 costs {drop:.2f} ± {error:.2f} points (limit {max_drop_points})"
    if drop + error <= max_drop_points + 1e-9:  # float noise must not refuse an exact limit
        return choice(INT8, cost)
    return choice(FP32, cost)
