"""The promotion gate's decision (pure logic)."""

from __future__ import annotations

import pytest

from refit.promotion import Baseline, decide


def test_first_version_is_promoted() -> None:
    decision = decide(0.3, None, margin=0.0, force=False)
    assert decision.promote and decision.baseline is None
    assert decision.as_dict()["baseline_evaluated"] is False


@pytest.mark.parametrize(
    ("candidate", "default", "margin", "promote"),
    [
        (0.90, 0.80, 0.0, True),
        (0.80, 0.80, 0.0, True),  # as good is good enough: the newer data wins ties
        (0.79, 0.80, 0.0, False),
        (0.85, 0.80, 0.1, False),  # better, but not by the margin
        (0.90, 0.80, 0.1, True),
    ],
)
def test_gate_compares_with_the_default_plus_margin(
    candidate: float, default: float, margin: float, promote: bool
) -> None:
    decision = decide(candidate, Baseline("4", default), margin=margin, force=False)
    assert decision.promote is promote
    assert ("v4" in decision.reason) and (">=" in decision.reason) is promote
    summary = decision.as_dict()
    assert summary["baseline_version"] == "4" and summary["baseline_accuracy"] == default


def test_incomparable_default_keeps_the_candidate_unless_forced() -> None:
    baseline = Baseline("2", None, "its class names differ from the new dataset's")
    kept = decide(0.99, baseline, margin=0.0, force=False)
    assert not kept.promote and "class names differ" in kept.reason and "force" in kept.reason
    assert kept.as_dict()["baseline_evaluated"] is False
    assert decide(0.99, baseline, margin=0.0, force=True).promote


def test_force_promotes_a_worse_candidate() -> None:
    decision = decide(0.1, Baseline("1", 0.9), margin=0.0, force=True)
    assert decision.promote and decision.reason == "forced by the request"
