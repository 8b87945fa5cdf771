"""The Grafana dashboard and its provisioning: every query parses and reads series that exist,
and the provisioning files point where compose mounts them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.deploy.helpers import (
    GRAFANA_DIR,
    assert_ok,
    load_yaml,
    recorded_names,
    run_tool,
    unknown_series,
)

DASHBOARD = GRAFANA_DIR / "dashboards" / "refit.json"


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict) -> list[dict]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def queries(dashboard: dict) -> list[str]:
    return [t["expr"] for p in panels(dashboard) for t in p["targets"]]


def grafana_mounts(compose: dict) -> dict[str, str]:
    """Container path -> repo path of each bind mount of the grafana service."""
    mounts = {}
    for volume in compose["services"]["grafana"]["volumes"]:
        source, target = volume.split(":")[:2]
        mounts[target] = source
    return mounts


def test_panels_have_unique_ids_and_queries(dashboard):
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        assert panel["targets"], panel["title"]
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]


def test_dashboard_covers_each_concern(dashboard):
    rows = {p["title"] for p in dashboard["panels"] if p["type"] == "row"}
    assert {"Traffic", "Latency", "Errors", "Models", "Training", "Data throughput"} <= rows


def test_dashboard_shows_workers_and_replicas(dashboard):
    """What the worker budget and the replica rotation do (docs/user-guide.md *Workers*)."""
    shown = " ".join(queries(dashboard))
    for series in (
        "refit_warm_versions",
        "refit_worker_scale_ups",
        "refit_worker_scale_downs",
        "refit_worker_scale_up_seconds",
        "refit_torchserve_replica_up",
        "refit_torchserve_replica_in_rotation",
    ):
        assert series in shown, series


def test_queries_parse(dashboard, tmp_path: Path):
    # promtool parses PromQL only inside rule files: one recording rule per query.
    rules = [
        {"record": f"dashboard:query:{i}", "expr": expr.replace("$__rate_interval", "5m")}
        for i, expr in enumerate(queries(dashboard))
    ]
    rule_file = tmp_path / "dashboard.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert_ok(run_tool("promtool", "check", "rules", rule_file))


def test_queries_read_only_known_series(dashboard):
    recorded = recorded_names()
    for expr in queries(dashboard):
        assert unknown_series(expr, recorded) == set(), expr


def test_queries_use_the_provisioned_datasource(dashboard):
    provisioned = load_yaml(GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml")
    (datasource,) = provisioned["datasources"]
    for panel in panels(dashboard):
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource["uid"], panel["title"]


def test_datasource_points_at_the_compose_prometheus(compose):
    provisioned = load_yaml(GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml")
    url = provisioned["datasources"][0]["url"]
    host, port = re.fullmatch(r"http://([\w-]+):(\d+)", url).groups()
    prometheus, grafana = compose["services"][host], compose["services"]["grafana"]
    assert set(prometheus["networks"]) & set(grafana["networks"]), "no network in common"
    # The container port Prometheus listens on (the one it publishes).
    assert [p.rsplit(":", 1)[1] for p in prometheus["ports"]] == [port]


def test_compose_mounts_provisioning_and_dashboards(compose):
    mounts = grafana_mounts(compose)
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    provider = load_yaml(GRAFANA_DIR / "provisioning" / "dashboards" / "refit.yml")["providers"][0]
    dashboards_dir = provider["options"]["path"]
    assert mounts[dashboards_dir] == "./deploy/grafana/dashboards"
    environment = compose["services"]["grafana"]["environment"]
    home = environment["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_dir}/{DASHBOARD.name}"
