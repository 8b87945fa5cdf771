"""deploy/k8s: every layout renders with `kubectl kustomize`, validates against the Kubernetes
schemas (offline), and holds what the deployment promises: probes, a GPU only where asked, the
headless Service and HPA wired to the right objects, secrets referenced and never shipped, and
settings the code reads. Hardened pods: test_k8s_invariants.py; NetworkPolicies:
test_k8s_network.py; Prometheus scraping every pod: test_k8s_prometheus.py."""

import copy
import re

import kubernetes_validate
import pytest

from tests.deploy.helpers import ROOT
from tests.deploy.k8s_model import (
    EXTRAS,
    GPU,
    K8S_DIR,
    LAYOUTS,
    containers,
    find,
    labels,
    named_ports,
    one,
    pod_templates,
    selects,
    workload_container,
)

# The oldest Kubernetes the manifests are for (lifecycle.preStop.sleep is on by default from
# 1.30; deploy/k8s/README.md) and the newest whose schemas kubernetes-validate bundles.
KUBERNETES_VERSIONS = ["1.30.0", "1.37.0"]
PLACEHOLDER = "change-me"


def schema_errors(objects: list[dict], version: str) -> list[str]:
    errors = []
    for o in objects:
        try:
            kubernetes_validate.validate(o, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{o['kind']}/{o['metadata']['name']}: {exc.message}")
    return errors


# --- schemas ----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("layout", [*LAYOUTS, *EXTRAS])
def test_every_object_matches_the_kubernetes_schema(rendered, layout, version):
    assert rendered[layout], f"{layout} rendered nothing"
    assert schema_errors(rendered[layout], version) == []


def test_schema_check_rejects_a_misspelled_field(rendered):
    # Strict validation is only worth something if an unknown field fails it.
    deployment = copy.deepcopy(one(rendered["base"], "Deployment", "refit-service"))
    security = deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    security["readonlyRootFilesystem"] = security.pop("readOnlyRootFilesystem")
    assert schema_errors([deployment], KUBERNETES_VERSIONS[-1])


# --- the objects the issue names --------------------------------------------------------------


def test_gpu_only_in_the_gpu_overlay(rendered):
    for layout, gpu in LAYOUTS.items():
        with_gpu = {
            name
            for name, pod in pod_templates(rendered[layout])
            for c in containers(pod)
            if GPU in str(c.get("resources"))
        }
        assert with_gpu == ({"refit-trainer"} if gpu else set()), layout
    trainer = workload_container(rendered["overlays/gpu"], "refit-trainer")
    assert trainer["resources"]["limits"][GPU] == trainer["resources"]["requests"][GPU] == "1"
    device = {e["name"]: e.get("value") for e in trainer["env"]}["REFIT_TRAINER_DEVICE"]
    assert device == "cuda"


# The port each workload's grpc.health.v1 answers on: each has its own server and threads, so
# no API call or stream, authenticated or not, can make it miss a probe (issues 23 and 25).
HEALTH_PORTS = {"refit-service": "health", "refit-trainer": "health"}


@pytest.mark.parametrize(("workload", "port_name"), HEALTH_PORTS.items())
def test_readiness_is_the_grpc_health_check(rendered, workload, port_name):
    container = workload_container(rendered["base"], workload)
    health_port = named_ports({"spec": {"containers": [container]}})[port_name]
    assert container["readinessProbe"]["grpc"]["port"] == health_port
    # Liveness: grpc health for the trainer; for the service only that it accepts connections,
    # since its health follows TorchServe's and a restart would not bring TorchServe back.
    liveness = container["livenessProbe"]
    assert liveness.get("grpc", {}).get("port") == health_port or liveness["tcpSocket"]["port"] in (
        port_name,
        health_port,
    )


def test_the_service_serves_health_where_its_probes_look(rendered):
    container = workload_container(rendered["base"], "refit-service")
    ports = named_ports({"spec": {"containers": [container]}})
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["REFIT_HEALTH_ADDRESS"] == f"0.0.0.0:{ports['health']}"
    assert env["REFIT_GRPC_ADDRESS"] == f"0.0.0.0:{ports['grpc']}"
    assert ports["health"] != ports["grpc"]


def test_the_trainer_serves_health_where_its_probes_look(rendered):
    container = workload_container(rendered["base"], "refit-trainer")
    ports = named_ports({"spec": {"containers": [container]}})
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["REFIT_TRAINER_HEALTH_ADDRESS"] == f"0.0.0.0:{ports['health']}"
    assert env["REFIT_TRAINER_GRPC_ADDRESS"] == f"0.0.0.0:{ports['grpc']}"
    assert ports["health"] != ports["grpc"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["health"], probe


def test_torchserve_has_two_replicas_behind_a_headless_service(rendered):
    objects = rendered["overlays/gpu"]
    deployment = one(objects, "Deployment", "torchserve")
    assert deployment["spec"]["replicas"] == 2
    headless = one(objects, "Service", "torchserve-headless")
    assert headless["spec"]["clusterIP"] == "None"
    selected = [
        name
        for name, pod in pod_templates(objects)
        if selects({"matchLabels": headless["spec"]["selector"]}, labels(pod))
    ]
    assert selected == ["torchserve"]
    ports = {p["port"] for p in headless["spec"]["ports"]}
    for workload in ("refit-service", "refit-trainer"):
        env = {e["name"]: e.get("value") for e in workload_container(objects, workload)["env"]}
        for setting in ("REFIT_TORCHSERVE_INFERENCE", "REFIT_TORCHSERVE_MANAGEMENT"):
            host, port = re.fullmatch(r"dns:///([\w-]+):(\d+)", env[setting]).groups()
            assert host == "torchserve-headless" and int(port) in ports, (workload, setting)


def test_the_service_reaches_each_torchserve_pod_s_rest_management_and_metrics(rendered):
    """Scaling to 0 workers (REST management) and idleness from TorchServe's inference counters
    (its metrics port): every pod, by the headless name, on the ports the pods listen on."""
    objects = rendered["base"]
    env = {e["name"]: e.get("value") for e in workload_container(objects, "refit-service")["env"]}
    ports = named_ports(dict(pod_templates(objects))["torchserve"])
    for setting, port_name in (
        ("REFIT_TORCHSERVE_MANAGEMENT_REST", "rest-management"),
        ("REFIT_TORCHSERVE_METRICS", "metrics"),
    ):
        host, port = re.fullmatch(r"dns:///([\w-]+):(\d+)", env[setting]).groups()
        assert host == "torchserve-headless" and int(port) == ports[port_name], setting


def test_the_hpa_scales_the_service(rendered):
    hpa = one(rendered["base"], "HorizontalPodAutoscaler", "refit-service")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "refit-service",
    }
    assert 2 <= hpa["minReplicas"] < hpa["maxReplicas"]


# --- secrets ----------------------------------------------------------------------------------


def secret_refs(objects: list[dict]) -> set[tuple[str, str]]:
    return {
        (env["valueFrom"]["secretKeyRef"]["name"], env["valueFrom"]["secretKeyRef"]["key"])
        for _, pod in pod_templates(objects)
        for c in containers(pod)
        for env in c.get("env", [])
        if "secretKeyRef" in env.get("valueFrom", {})
    }


def test_secrets_are_referenced_never_shipped(rendered):
    example = {
        (s["metadata"]["name"], key)
        for s in find(rendered["secrets-example"], "Secret")
        for key in s["stringData"]
    }
    for layout in LAYOUTS:
        # A Secret in an applied layout would overwrite the real one on every apply.
        assert not find(rendered[layout], "Secret"), layout
        assert secret_refs(rendered[layout]) == example, layout


def test_example_secrets_hold_only_placeholders(rendered):
    for secret in find(rendered["secrets-example"], "Secret"):
        for key, value in secret["stringData"].items():
            if re.search(r"SECRET|TOKEN|PASSWORD", key):
                assert value == PLACEHOLDER, (secret["metadata"]["name"], key)


def test_readme_shows_how_to_create_each_secret(rendered):
    readme = (K8S_DIR / "README.md").read_text()
    for name, key in secret_refs(rendered["base"]):
        command = re.search(rf"kubectl [^\n]*create secret generic {name} ([^\n]*)", readme)
        assert command, f"README has no `kubectl create secret generic {name}`"
        assert f"--from-literal={key}=" in command.group(1), (name, key)


# --- configuration the code and the images read -----------------------------------------------


def test_every_setting_is_one_the_code_reads(rendered):
    readers = ("refit", "service", "trainer", "deploy/torchserve")  # the last: TorchServe's keeper
    source = "\n".join(p.read_text() for d in readers for p in (ROOT / d).rglob("*.py"))
    for name, pod in pod_templates(rendered["overlays/gpu"]):
        for c in containers(pod):
            for env in c.get("env", []):
                if env["name"].startswith(("REFIT_", "MINIO_")):
                    assert f'"{env["name"]}"' in source, f"{name}: {env['name']} is read nowhere"


def test_archives_come_from_an_endpoint_torchserve_allows(rendered):
    # TorchServe fetches archives by the presigned URLs the service and trainer sign for their
    # MINIO_ENDPOINT, and only from URLs its image's allowed_urls admits.
    properties = (ROOT / "deploy" / "torchserve" / "config.properties").read_text()
    allowed = re.search(r"^allowed_urls=(.+)$", properties, re.M).group(1).split(",")
    objects = rendered["base"]
    for workload in ("refit-service", "refit-trainer"):
        env = {e["name"]: e.get("value") for e in workload_container(objects, workload)["env"]}
        url = f"{env['MINIO_ENDPOINT']}/refit/archives/ab12.mar?X-Amz-Signature=00"
        assert any(re.fullmatch(pattern, url) for pattern in allowed), (workload, url)
        host = re.fullmatch(r"https?://([\w-]+):\d+", env["MINIO_ENDPOINT"]).group(1)
        assert one(objects, "Service", host)["spec"]["type"] == "ExternalName"
