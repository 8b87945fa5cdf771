"""Reading TorchServe's answers that decide workers (pure logic, on text TorchServe 0.12 sent):
its inference counters, and its workers' start times. tests/service/test_workers_shared.py reads
them from a real TorchServe."""

from __future__ import annotations

import pytest

from refit.errors import FailedPrecondition
from refit.torchserve.counters import epoch, inference_counts

# Captured from TorchServe 0.12 (metrics_mode=prometheus): note the trailing comma in the labels.
EXPOSITION = """\
# HELP ts_inference_requests_total Torchserve prometheus counter metric with unit: Count
# TYPE ts_inference_requests_total counter
ts_inference_requests_total{model_name="imagenet",model_version="default",hostname="vm",} 1.0
ts_inference_requests_total{model_name="imagenet",model_version="2",hostname="vm",} 1.0
ts_inference_requests_total{model_name="imagenet",model_version="1",hostname="vm",} 48.0
# HELP ts_queue_latency_microseconds Torchserve prometheus counter metric with unit: Microseconds
# TYPE ts_queue_latency_microseconds counter
# HELP MemoryUtilization Torchserve prometheus gauge metric with unit: Percent
# TYPE MemoryUtilization gauge
MemoryUtilization{Level="Host",Hostname="vm",} 8.0
"""
# A TorchServe that has received no request yet still exports the family, without samples.
FRESH = """\
# HELP ts_inference_requests_total Torchserve prometheus counter metric with unit: Count
# TYPE ts_inference_requests_total counter
"""


def test_counts_per_model_and_version() -> None:
    assert inference_counts(EXPOSITION, "ts-a") == {
        ("imagenet", "default"): 1.0,
        ("imagenet", "2"): 1.0,
        ("imagenet", "1"): 48.0,
    }
    assert inference_counts(FRESH, "ts-a") == {}


def test_a_torchserve_without_prometheus_metrics_is_refused_with_the_fix() -> None:
    """metrics_mode=log (TorchServe's default) answers /metrics with an empty body: reading
    that as "no use anywhere" would stop every version as idle."""
    with pytest.raises(FailedPrecondition, match="metrics_mode=prometheus"):
        inference_counts("", "ts-a")


def test_worker_start_times_are_read_as_utc() -> None:
    assert epoch("2026-12-07T19:49:03.312Z") == pytest.approx(1796672943.312)
    assert epoch("") == 0.0
