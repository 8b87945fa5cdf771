"""Which epoch a run keeps."""

from __future__ import annotations

import pytest
import torch

from tests.trainer.fitting import kept_epoch
from trainer.engine import EvalResult
from trainer.selection import EpochSelection


@pytest.mark.parametrize(
    ("accuracies", "images", "kept"),
    [
        ([0.5, 0.9, 0.89, 0.7], 400, 2),  # 0.89 is within one SE (0.015) of 0.9: the later wins
        ([0.5, 0.9, 0.85, 0.7], 400, 1),  # 0.85 is not: the top one stays
        ([0.6, 0.6, 0.6], 100, 2),  # ties go to the latest epoch
        ([0.5, 0.9, 0.88, 0.95], 400, 3),
        ([0.5, 0.9, 0.88, 0.95], 40, 3),
        ([0.5, 0.9, 0.88, 0.86], 40, 3),  # 40 images: SE 0.047, so 0.86 is still noise
    ],
)
def test_the_kept_epoch_is_the_latest_within_noise_of_the_top(
    accuracies: list[float], images: int, kept: int
) -> None:
    assert kept_epoch(accuracies, images) == kept


def test_patience_counts_epochs_since_the_top_accuracy_last_rose() -> None:
    selection, model = EpochSelection(), torch.nn.Linear(1, 1)
    stops = []
    for epoch, accuracy in enumerate([0.5, 0.7, 0.6, 0.65, 0.8, 0.7]):
        result = EvalResult(loss=0.0, accuracy=accuracy, per_class_accuracy=[], confusion=[],
                            images=1000)  # fmt: skip
        improved = selection.record(epoch, result, model)
        stops.append(selection.should_stop(improved, patience=2))
    assert stops == [False, False, False, True, False, False]
    assert selection.bad_epochs == 1 and selection.epoch == 4
    assert selection.evaluation.accuracy == 0.8 and selection.top_accuracy == 0.8
