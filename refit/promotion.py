"""The promotion gate: does a new version become its model's default?

The candidate's validation accuracy against the current default's on the SAME validation split
(the caller evaluates the default, see ``BaselineFn``). A default whose class names differ from the
candidate's cannot be compared: the candidate stays a candidate unless ``force`` (changing the
labels clients get back is a decision for a person, not the gate).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from refit.registry import VersionRecord


@dataclass(frozen=True)
class Baseline:
    """The current default, evaluated on the candidate's validation split."""

    version: str
    accuracy: float | None  # None: not comparable (see reason)
    reason: str = ""


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    candidate_accuracy: float
    baseline: Baseline | None  # None: the model had no default

    def as_dict(self) -> dict:
        base = self.baseline
        return {
            "promoted": self.promote,
            "reason": self.reason,
            "candidate_accuracy": self.candidate_accuracy,
            "baseline_version": base.version if base else "",
            "baseline_accuracy": base.accuracy if base and base.accuracy is not None else 0.0,
            "baseline_evaluated": bool(base and base.accuracy is not None),
        }


BaselineFn = Callable[[VersionRecord], Baseline]  # current default record -> its evaluation


def decide(
    candidate_accuracy: float, baseline: Baseline | None, *, margin: float, force: bool
) -> GateDecision:
    """Promote when the candidate is at least as good as the default plus ``margin``."""
    if force:
        return GateDecision(True, "forced by the request", candidate_accuracy, baseline)
    if baseline is None:
        return GateDecision(True, "first version with a default", candidate_accuracy, None)
    if baseline.accuracy is None:
        reason = f"not comparable with default v{baseline.version}: {baseline.reason}; use force"
        return GateDecision(False, reason, candidate_accuracy, baseline)
    needed = baseline.accuracy + margin
    verdict = ">=" if candidate_accuracy >= needed else "<"
    reason = (
        f"val_accuracy {candidate_accuracy:.4f} {verdict} default v{baseline.version} "
        f"{baseline.accuracy:.4f} + margin {margin:g}"
    )
    return GateDecision(candidate_accuracy >= needed, reason, candidate_accuracy, baseline)
