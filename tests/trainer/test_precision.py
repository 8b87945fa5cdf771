"""The int8 gate: int8 is served iff its validation accuracy drop plus one standard error of the
paired difference is at most the setting's points, and never when fp32 is asked for or nothing
could be measured."""

from __future__ import annotations

import pytest

from trainer.precision import AUTO, FP32, INT8, Comparison, choose_precision


def compared(fp32: int, int8: int, discordant: int, images: int = 10_000) -> Comparison:
    return Comparison(images, fp32, int8, discordant)


@pytest.mark.parametrize(
    ("comparison", "served"),
    [
        (compared(9000, 9000, 0), INT8),  # the same answers
        (compared(9000, 9010, 20), INT8),  # int8 better: -0.10 + 0.04
        (compared(9000, 8975, 25), INT8),  # 0.25 + 0.05: exactly at the limit
        (compared(9000, 8975, 36), FP32),  # 0.25 + 0.06
        (compared(9000, 8960, 40), FP32),  # 0.40 + 0.06
        (compared(436, 436, 4, images=500), FP32),  # no drop, but 0.40 of noise on 500 images
    ],
)
def test_int8_is_served_iff_drop_and_its_error_are_within_the_setting(comparison, served):
    choice = choose_precision(AUTO, None, comparison, max_drop_points=0.3)
    assert choice.precision == served, choice.reason
    assert choice.fp32_accuracy == comparison.fp32_accuracy
    assert choice.int8_accuracy == comparison.int8_accuracy


def test_the_setting_moves_the_limit() -> None:
    assert choose_precision(AUTO, None, compared(9000, 8900, 100), 1.5).precision == INT8
    assert choose_precision(AUTO, None, compared(9000, 9000, 0), 0.0).precision == INT8
    assert choose_precision(AUTO, None, compared(9000, 9000, 2), 0.0).precision == FP32


def test_fp32_asked_for_is_fp32_whatever_int8_scores() -> None:
    choice = choose_precision(FP32, 0.9, None)
    assert choice.precision == FP32 and "asked" in choice.reason
    assert (choice.fp32_accuracy, choice.int8_accuracy) == (0.9, None)


def test_without_measurements_the_version_stays_fp32() -> None:
    """The base model has no validation split; a run may have nothing to calibrate on."""
    assert choose_precision(AUTO, None, None).precision == FP32
    assert choose_precision(AUTO, 0.9, None).precision == FP32
    assert choose_precision(AUTO, None, Comparison(0, 0, 0, 0)).precision == FP32


def test_int8_cannot_be_forced() -> None:
    with pytest.raises(ValueError, match="precision"):
        choose_precision(INT8, 0.9, compared(9000, 9000, 0))
