"""Prometheus configs and rules: promtool's checks and unit tests, plus the contracts between
the two configs, the rules, the metric names the code exposes and the runbook."""

from __future__ import annotations

import re

import pytest

from tests.deploy.helpers import (
    PROMETHEUS_DIR,
    ROOT,
    assert_ok,
    load_yaml,
    recorded_names,
    run_tool,
    unknown_series,
)

CONFIGS = ["prometheus.yml", "prometheus.local.yml"]
JOBS = {"refit-service": 9101, "refit-trainer": 9102, "torchserve": 8082}
# Compose service name behind each scrape job.
COMPOSE_HOSTS = {"refit-service": "service", "refit-trainer": "trainer", "torchserve": "torchserve"}
SEVERITIES = {"critical", "warning"}


def alert_rules() -> list[dict]:
    groups = load_yaml(PROMETHEUS_DIR / "rules" / "alerts.yml")["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def all_rules() -> list[dict]:
    paths = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
    return [rule for p in paths for group in load_yaml(p)["groups"] for rule in group["rules"]]


def targets(config: dict) -> dict[str, list[str]]:
    """Each job's targets, static or discovered through DNS (``name:port`` for each name)."""
    return {
        job["job_name"]: [t for sc in job.get("static_configs", []) for t in sc["targets"]]
        + [f"{name}:{sd['port']}" for sd in job.get("dns_sd_configs", []) for name in sd["names"]]
        for job in config["scrape_configs"]
    }


def test_replicated_compose_services_are_discovered_through_dns():
    """The service and TorchServe may run several replicas: each address is a target."""
    config = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    for job in config["scrape_configs"]:
        if job["job_name"] in ("refit-service", "torchserve"):
            assert [sd["type"] for sd in job["dns_sd_configs"]] == ["A"], job
            assert "static_configs" not in job, job


@pytest.mark.parametrize("config", CONFIGS)
def test_config_is_valid_and_loads_the_rules(config):
    result = run_tool("promtool", "check", "config", config, cwd=PROMETHEUS_DIR)
    assert_ok(result)
    # promtool checks each rule file the config names; none listed means the glob missed.
    checked = re.findall(r"Checking (\S+)", result.stdout)
    assert {"rules/recording.yml", "rules/alerts.yml"} <= set(checked), result.stdout


def test_rule_files_are_valid():
    paths = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
    assert len(paths) >= 2
    assert_ok(run_tool("promtool", "check", "rules", *paths))


def test_rule_unit_tests_pass():
    paths = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
    assert paths, "no promtool unit tests in deploy/prometheus/tests"
    result = run_tool("promtool", "test", "rules", *paths)
    assert_ok(result)


def test_every_alert_is_unit_tested_firing_and_quiet():
    expected = {rule["alert"] for rule in alert_rules()}
    firing, quiet = set(), set()
    for path in (PROMETHEUS_DIR / "tests").glob("*.yml"):
        for case in load_yaml(path)["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert expected - firing == set(), "alerts never tested firing"
    assert expected - quiet == set(), "alerts never tested staying quiet"


def test_local_config_has_the_same_jobs_and_rules_on_loopback():
    compose_config = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    local_config = load_yaml(PROMETHEUS_DIR / "prometheus.local.yml")
    assert local_config["rule_files"] == compose_config["rule_files"]
    assert targets(local_config) == {job: [f"127.0.0.1:{port}"] for job, port in JOBS.items()}
    assert targets(compose_config) == {
        job: [f"{COMPOSE_HOSTS[job]}:{port}"] for job, port in JOBS.items()
    }


def test_scrape_targets_match_the_compose_services(compose):
    services = compose["services"]
    assert set(COMPOSE_HOSTS.values()) <= set(services)
    metrics_address = services["service"]["environment"]["REFIT_METRICS_ADDRESS"]
    assert metrics_address.endswith(f":{JOBS['refit-service']}")
    properties = (ROOT / "deploy" / "torchserve" / "config.properties").read_text()
    assert f"metrics_address=http://0.0.0.0:{JOBS['torchserve']}" in properties


def test_alerts_carry_severity_and_operator_guidance():
    runbook = (ROOT / "docs" / "operations.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9-]", "", line.lstrip("#").strip().lower().replace(" ", "-"))
        for line in runbook.splitlines()
        if line.startswith("#")
    }
    for rule in alert_rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        page, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert page == "docs/operations.md" and anchor in anchors, f"{name}: no runbook section"


def test_rules_use_only_known_series():
    recorded = recorded_names()
    for rule in all_rules():
        name = rule.get("alert", rule.get("record"))
        assert unknown_series(rule["expr"], recorded) == set(), name


def test_client_errors_are_not_counted_as_errors():
    errors = next(r for r in all_rules() if r.get("record") == "method:refit_rpc_errors:rate5m")
    matcher = re.search(r'code!~"([^"]+)"', errors["expr"]).group(1)
    not_errors = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "RESOURCE_EXHAUSTED",
                  "UNAUTHENTICATED", "PERMISSION_DENIED"}  # fmt: skip
    assert set(matcher.split("|")) == not_errors
