"""Reading what TorchServe says about use: its inference counters (metrics API) and its workers'
start times (describe), the truth every service replica shares about which versions are used."""

from __future__ import annotations

from datetime import datetime

from prometheus_client.parser import text_string_to_metric_families

from refit.errors import FailedPrecondition, RefitError

# TorchServe's frontend counter of inference requests, per model and version (its samples end in
# _total): every request it received, answered or refused, whoever sent it.
INFERENCE_COUNTER = "ts_inference_requests"


def epoch(timestamp: str) -> float:
    """TorchServe's ISO 8601 time (``2026-12-07T19:49:03.312Z``) as epoch seconds; 0 unread."""
    try:
        return datetime.fromisoformat(timestamp).timestamp()
    except ValueError:
        return 0.0


def inference_counts(text: str, where: str) -> dict[tuple[str, str], float]:
    """(model, version) -> requests, from TorchServe's Prometheus exposition."""
    counts: dict[tuple[str, str], float] = {}
    exported = False
    try:
        for family in text_string_to_metric_families(text):
            if family.name != INFERENCE_COUNTER:
                continue
            exported = True
            for sample in family.samples:
                if sample.name == f"{INFERENCE_COUNTER}_total":
                    key = (
                        sample.labels.get("model_name", ""),
                        sample.labels.get("model_version", ""),
                    )
                    counts[key] = counts.get(key, 0.0) + sample.value
    except ValueError as exc:
        raise RefitError(f"TorchServe's metrics on {where} do not parse: {exc}") from exc
    if not exported:
        raise FailedPrecondition(
            f"TorchServe on {where} exports no {INFERENCE_COUNTER}_total: run it with "
            "metrics_mode=prometheus"
        )
    return counts
