"""A version record as GetModel shows it: precision and both accuracies (issue 25)."""

from __future__ import annotations

from refit.registry import VersionRecord
from refit.v1 import refit_pb2 as pb
from service.servicer import _version


def test_precision_and_accuracies_are_shown_and_unmeasured_ones_unset() -> None:
    int8 = VersionRecord("m", "3", "archives/m/x.mar", ["a"], precision="int8",
                         fp32_accuracy=0.9, int8_accuracy=0.899)  # fmt: skip
    shown = _version(int8, is_default=True)
    assert shown.precision == pb.PRECISION_INT8
    assert (shown.fp32_accuracy, shown.int8_accuracy) == (0.9, 0.899)
    older = _version(VersionRecord("m", "1", "archives/m/y.mar", ["a"]), is_default=False)
    assert older.precision == pb.PRECISION_FP32
    assert not older.HasField("fp32_accuracy") and not older.HasField("int8_accuracy")
