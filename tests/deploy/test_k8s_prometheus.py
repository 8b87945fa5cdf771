"""deploy/k8s: Prometheus scrapes every pod on its metrics port, under the job names the alert
rules watch."""

import copy
import glob
import re

from tests.deploy.helpers import PROMETHEUS_DIR
from tests.deploy.k8s_model import (
    JOBS,
    K8S_DIR,
    load,
    one,
    pod_targets,
    pod_templates,
    relabel,
)

# --- Prometheus -------------------------------------------------------------------------------

SCRAPE_CONFIG = K8S_DIR / "prometheus" / "prometheus.yml"


def scrape_targets(objects: list[dict]) -> dict[str, set[tuple[str, str]]]:
    """Workload -> the (job, address) pairs the scrape config makes of its pod."""
    (job,) = load(SCRAPE_CONFIG)["scrape_configs"]
    found = {}
    for name, pod in pod_templates(objects):
        kept = (relabel(t, job["relabel_configs"]) for t in pod_targets(pod))
        found[name] = {(t["job"], t["__address__"]) for t in kept if t is not None}
    return found


def test_prometheus_scrapes_every_pod_on_its_metrics_port(rendered):
    targets = scrape_targets(rendered["overlays/gpu"])
    assert targets == {
        workload: {(workload, f"10.0.0.7:{port}")} for workload, port in JOBS.items()
    }
    (job,) = load(SCRAPE_CONFIG)["scrape_configs"]
    assert [sd["namespaces"]["names"] for sd in job["kubernetes_sd_configs"]] == [["refit"]]


def test_scrape_jobs_are_the_ones_the_alerts_watch():
    alerts = (PROMETHEUS_DIR / "rules" / "alerts.yml").read_text()
    watched = {j for expr in re.findall(r'up\{job=~?"([^"]+)"\}', alerts) for j in expr.split("|")}
    assert watched == set(JOBS)
    rule_globs = load(SCRAPE_CONFIG)["rule_files"]
    assert all(glob.glob(str(SCRAPE_CONFIG.parent / g)) for g in rule_globs), rule_globs


def test_relabelling_drops_a_pod_without_the_annotation(rendered):
    objects = copy.deepcopy(rendered["base"])
    one(objects, "Deployment", "torchserve")["spec"]["template"]["metadata"]["annotations"][
        "prometheus.io/scrape"
    ] = "false"
    assert scrape_targets(objects)["torchserve"] == set()
