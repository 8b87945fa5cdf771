"""The local stack's Prometheus configuration: deploy/prometheus/prometheus.local.yml with the
stack's ports."""

from __future__ import annotations

from pathlib import Path

import yaml

from local_stack.settings import StackSettings

PROMETHEUS_CONFIG = (
    Path(__file__).resolve().parent.parent / "deploy/prometheus/prometheus.local.yml"
)


def render_prometheus_config(settings: StackSettings, path: Path) -> None:
    """deploy/prometheus/prometheus.local.yml with this stack's ports and absolute rule paths."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"]["scrape_interval"] = settings.scrape_interval
    config["global"]["evaluation_interval"] = settings.scrape_interval
    config["rule_files"] = [str(PROMETHEUS_CONFIG.parent / f) for f in config["rule_files"]]
    targets = settings.scrape_targets()
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
