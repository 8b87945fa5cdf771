"""Which epoch a run keeps, and when it stops early.

The kept epoch is the latest one within one standard error of the best validation accuracy: on a
small validation set a lower-LR later epoch that scores a little lower is noise, not worse, and
picking the single highest score would often pick an early, undertrained epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from trainer.engine import EvalResult


def within_noise(accuracy: float, top: float, images: int) -> bool:
    """True when ``accuracy`` is within one standard error of ``top`` on ``images`` val images."""
    standard_error = math.sqrt(top * (1 - top) / max(images, 1))
    return accuracy >= top - standard_error


@dataclass
class EpochSelection:
    epoch: int = -1  # the epoch kept
    accuracy: float = -1.0  # its validation accuracy
    top_accuracy: float = -1.0  # the highest validation accuracy so far
    state: dict | None = None  # the kept epoch's weights, on the CPU
    evaluation: EvalResult | None = None  # the kept epoch's validation
    bad_epochs: int = 0  # epochs since the top accuracy last rose

    def record(self, epoch: int, result: EvalResult, model: nn.Module) -> bool:
        """Keep ``epoch`` (a copy of ``model``'s weights) if it is within noise of the top;
        True when it sets a new top accuracy."""
        improved = result.accuracy > self.top_accuracy
        self.top_accuracy = max(self.top_accuracy, result.accuracy)
        if within_noise(result.accuracy, self.top_accuracy, result.images):
            self.epoch, self.accuracy, self.evaluation = epoch, result.accuracy, result
            self.state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        self.bad_epochs = 0 if improved else self.bad_epochs + 1
        return improved

    def should_stop(self, improved: bool, patience: int | None) -> bool:
        """Early stopping: ``patience`` epochs in a row without a new top accuracy."""
        return not improved and patience is not None and self.bad_epochs >= patience
