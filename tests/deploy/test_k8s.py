"""deploy/k8s: every layout renders with `kubectl kustomize`, validates against the Kubernetes
schemas (offline), and keeps the invariants the deployment promises: hardened pods, probes,
resources, a GPU only where asked, the headless Service and HPA wired to the right objects,
NetworkPolicies that allow exactly the documented paths, and Prometheus scraping every pod."""

from __future__ import annotations

import copy
import glob
import re

import kubernetes_validate
import pytest

from tests.deploy.helpers import PROMETHEUS_DIR, ROOT
from tests.deploy.k8s_model import (
    GPU,
    K8S_DIR,
    Pod,
    containers,
    find,
    labels,
    load,
    named_ports,
    one,
    pod_problems,
    pod_targets,
    pod_templates,
    pods_of,
    problems,
    reaches,
    relabel,
    render,
    selects,
)

# Each layout a user applies, and whether its trainer gets a GPU.
LAYOUTS = {"base": False, "overlays/gpu": True}
EXTRAS = ["secrets-example", "minio-tenant"]
# The oldest Kubernetes the manifests are for (lifecycle.preStop.sleep is on by default from
# 1.30; deploy/k8s/README.md) and the newest whose schemas kubernetes-validate bundles.
KUBERNETES_VERSIONS = ["1.30.0", "1.37.0"]
# Scrape jobs, named as the alert rules expect, and their metrics ports.
JOBS = {"refit-service": 9101, "torchserve": 8082, "refit-trainer": 9102}
PLACEHOLDER = "change-me"


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {layout: render(layout) for layout in [*LAYOUTS, *EXTRAS]}


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


# --- invariants -------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_invariants_hold(rendered, layout):
    assert problems(rendered[layout], gpu=LAYOUTS[layout]) == []


def _container(objects: list[dict], workload: str) -> dict:
    return one(objects, "Deployment", workload)["spec"]["template"]["spec"]["containers"][0]


POD = ("spec", "template", "spec")
CONTAINER = (*POD, "containers", 0)
LIMITS = (*CONTAINER, "resources", "limits")
REMOVE = object()


def mutate(objects: list[dict], kind: str, name: str, path: tuple, value) -> None:
    """Sets (or with REMOVE deletes) the value at ``path`` (keys and list indices) of an object."""
    *parents, last = path
    target = one(objects, kind, name)
    for key in parents:
        target = target[key]
    if value is REMOVE:
        del target[last]
    else:
        target[last] = value


# name: (layout, (kind, name, path, value) of the change, what problems() must report)
MUTATIONS = {
    "privileged": (
        "base",
        ("Deployment", "torchserve", (*CONTAINER, "securityContext", "privileged"), True),
        "torchserve: container torchserve: privileged",
    ),
    "root allowed": (
        "base",
        ("Deployment", "refit-service", (*POD, "securityContext", "runAsNonRoot"), False),
        "refit-service: pod securityContext.runAsNonRoot is not true",
    ),
    "privilege escalation": (
        "overlays/gpu",
        (
            "Deployment",
            "refit-trainer",
            (*CONTAINER, "securityContext", "allowPrivilegeEscalation"),
            REMOVE,
        ),
        "refit-trainer: container trainer: allowPrivilegeEscalation is not false",
    ),
    "writable root": (
        "base",
        (
            "Deployment",
            "refit-service",
            (*CONTAINER, "securityContext", "readOnlyRootFilesystem"),
            False,
        ),
        "refit-service: container service: root filesystem is writable",
    ),
    "capability kept": (
        "base",
        (
            "Deployment",
            "torchserve",
            (*CONTAINER, "securityContext", "capabilities", "drop"),
            ["NET_RAW"],
        ),
        "torchserve: container torchserve: does not drop ALL capabilities",
    ),
    "no memory limit": (
        "base",
        ("Deployment", "torchserve", (*LIMITS, "memory"), REMOVE),
        "torchserve: container torchserve: no memory limit",
    ),
    "no cpu request": (
        "base",
        ("Deployment", "refit-service", (*CONTAINER, "resources", "requests", "cpu"), REMOVE),
        "refit-service: container service: no cpu request",
    ),
    "no readiness probe": (
        "overlays/gpu",
        ("Deployment", "refit-trainer", (*CONTAINER, "readinessProbe"), REMOVE),
        "refit-trainer: container trainer: no readinessProbe",
    ),
    "GPU in base": (
        "base",
        ("Deployment", "refit-trainer", (*LIMITS, GPU), "1"),
        "refit-trainer: container trainer requests a GPU",
    ),
    "GPU lost in the overlay": (
        "overlays/gpu",
        ("Deployment", "refit-trainer", (*LIMITS, GPU), REMOVE),
        f"refit-trainer: container trainer has no {GPU} limit",
    ),
    "GPU for the service": (
        "overlays/gpu",
        ("Deployment", "refit-service", (*LIMITS, GPU), "1"),
        "refit-service: container service requests a GPU",
    ),
    "not scraped": (
        "base",
        (
            "Deployment",
            "refit-trainer",
            ("spec", "template", "metadata", "annotations", "prometheus.io/scrape"),
            REMOVE,
        ),
        "refit-trainer: pod is not annotated for Prometheus (prometheus.io/scrape)",
    ),
    "headless Service selects nothing": (
        "base",
        (
            "Service",
            "torchserve-headless",
            ("spec", "selector", "app.kubernetes.io/name"),
            "torch-serve",
        ),
        "Service torchserve-headless selects no pod",
    ),
    "Service targets an undeclared port": (
        "base",
        ("Service", "refit-trainer", ("spec", "ports", 0, "targetPort"), "grpcs"),
        "Service refit-trainer targets port grpcs, which its pods do not declare",
    ),
    "HPA targets a missing Deployment": (
        "base",
        (
            "HorizontalPodAutoscaler",
            "refit-service",
            ("spec", "scaleTargetRef", "name"),
            "refit-api",
        ),
        "HPA refit-service targets a missing Deployment refit-api",
    ),
    "replicas fight the HPA": (
        "base",
        ("Deployment", "refit-service", ("spec", "replicas"), 2),
        "refit-service sets replicas, which the HPA owns",
    ),
    "NetworkPolicy selects nothing": (
        "base",
        (
            "NetworkPolicy",
            "torchserve",
            ("spec", "podSelector", "matchLabels", "app.kubernetes.io/name"),
            "torch-serve",
        ),
        "NetworkPolicy torchserve selects no pod",
    ),
    "NetworkPolicy admits a missing pod": (
        "base",
        (
            "NetworkPolicy",
            "torchserve",
            (
                "spec",
                "ingress",
                0,
                "from",
                0,
                "podSelector",
                "matchLabels",
                "app.kubernetes.io/name",
            ),
            "service",
        ),
        "NetworkPolicy torchserve: an ingress peer selects no pod",
    ),
    "NetworkPolicy names a missing port": (
        "base",
        (
            "NetworkPolicy",
            "refit-metrics-scrape",
            ("spec", "ingress", 0, "ports", 0, "port"),
            "prometheus",
        ),
        "NetworkPolicy refit-metrics-scrape names port prometheus, which a pod lacks",
    ),
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_checker_catches(rendered, mutation):
    layout, change, expected = MUTATIONS[mutation]
    objects = copy.deepcopy(rendered[layout])
    mutate(objects, *change)
    assert expected in problems(objects, gpu=LAYOUTS[layout])


def test_every_pod_runs_as_the_images_user(rendered):
    image_users = set(re.findall(r"^USER (\d+)", (ROOT / "Dockerfile").read_text(), re.M))
    assert image_users, "the Dockerfile names no numeric USER"
    for name, pod in pod_templates(rendered["overlays/gpu"]):
        assert {str(pod["spec"]["securityContext"]["runAsUser"])} == image_users, name
        assert not list(pod_problems(pod)), name


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
    trainer = _container(rendered["overlays/gpu"], "refit-trainer")
    assert trainer["resources"]["limits"][GPU] == trainer["resources"]["requests"][GPU] == "1"
    device = {e["name"]: e.get("value") for e in trainer["env"]}["REFIT_TRAINER_DEVICE"]
    assert device == "cuda"


# The port each workload's grpc.health.v1 answers on: each has its own server and threads, so
# no API call or stream, authenticated or not, can make it miss a probe (issues 23 and 25).
HEALTH_PORTS = {"refit-service": "health", "refit-trainer": "health"}


@pytest.mark.parametrize(("workload", "port_name"), HEALTH_PORTS.items())
def test_readiness_is_the_grpc_health_check(rendered, workload, port_name):
    container = _container(rendered["base"], workload)
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
    container = _container(rendered["base"], "refit-service")
    ports = named_ports({"spec": {"containers": [container]}})
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["REFIT_HEALTH_ADDRESS"] == f"0.0.0.0:{ports['health']}"
    assert env["REFIT_GRPC_ADDRESS"] == f"0.0.0.0:{ports['grpc']}"
    assert ports["health"] != ports["grpc"]


def test_the_trainer_serves_health_where_its_probes_look(rendered):
    container = _container(rendered["base"], "refit-trainer")
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
        env = {e["name"]: e.get("value") for e in _container(objects, workload)["env"]}
        for setting in ("REFIT_TORCHSERVE_INFERENCE", "REFIT_TORCHSERVE_MANAGEMENT"):
            host, port = re.fullmatch(r"dns:///([\w-]+):(\d+)", env[setting]).groups()
            assert host == "torchserve-headless" and int(port) in ports, (workload, setting)


def test_the_service_reaches_each_torchserve_pod_s_rest_management_and_metrics(rendered):
    """Scaling to 0 workers (REST management) and idleness from TorchServe's inference counters
    (its metrics port): every pod, by the headless name, on the ports the pods listen on."""
    objects = rendered["base"]
    env = {e["name"]: e.get("value") for e in _container(objects, "refit-service")["env"]}
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
        env = {e["name"]: e.get("value") for e in _container(objects, workload)["env"]}
        url = f"{env['MINIO_ENDPOINT']}/refit/archives/ab12.mar?X-Amz-Signature=00"
        assert any(re.fullmatch(pattern, url) for pattern in allowed), (workload, url)
        host = re.fullmatch(r"https?://([\w-]+):\d+", env["MINIO_ENDPOINT"]).group(1)
        assert one(objects, "Service", host)["spec"]["type"] == "ExternalName"


# --- network paths ----------------------------------------------------------------------------

PROMETHEUS = Pod("prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"})
STRANGER = Pod("stranger", "default", {"app": "curl"})  # any other pod of the cluster
INTRUDER = Pod("intruder", "refit", {"app": "debug"})  # a pod started by hand in refit's namespace
MINIO = Pod("minio", "minio", {"v1.min.io/tenant": "refit"})
DNS = Pod("coredns", "kube-system", {"k8s-app": "kube-dns"})


@pytest.fixture(scope="module")
def network(rendered):
    policies = find(rendered["base"], "NetworkPolicy") + find(
        rendered["minio-tenant"], "NetworkPolicy"
    )
    pods = pods_of(rendered["base"])
    actors = [*pods.values(), PROMETHEUS, STRANGER, INTRUDER]

    def reached_by(target: Pod, port: int) -> set[str]:
        return {a.name for a in actors if a is not target and reaches(policies, a, target, port)}

    return pods, reached_by, policies


def test_only_the_service_and_the_trainer_reach_torchserve(network):
    pods, reached_by, _ = network
    for port in (7070, 7071):
        assert reached_by(pods["torchserve"], port) == {"refit-service", "refit-trainer"}
    assert reached_by(pods["torchserve"], 8080) == set()  # TorchServe's REST inference
    # REST management: the service alone, to scale versions to 0 workers (gRPC cannot)
    assert reached_by(pods["torchserve"], 8081) == {"refit-service"}


def test_prometheus_alone_reaches_the_metrics_ports_and_the_service_torchserve_s(network):
    """And the service TorchServe's: it reads each pod's inference counters
    (REFIT_TORCHSERVE_METRICS) to tell which versions any service replica uses."""
    pods, reached_by, _ = network
    for workload, port in JOBS.items():
        readers = {"prometheus", "refit-service"} if workload == "torchserve" else {"prometheus"}
        assert reached_by(pods[workload], port) == readers, workload


def test_only_refit_components_reach_minio(network):
    _, reached_by, _ = network
    assert reached_by(MINIO, 9000) == {"refit-service", "torchserve", "refit-trainer"}


def test_the_api_is_open_and_the_trainer_internal(network):
    pods, reached_by, _ = network
    assert {"stranger", "prometheus"} <= reached_by(pods["refit-service"], 50051)
    assert reached_by(pods["refit-trainer"], 50052) == {"refit-service"}
    assert reached_by(pods["refit-trainer"], 50053) == set()  # health: the kubelet's probes only


def test_pods_reach_dns_and_nothing_outside(network):
    pods, _, policies = network
    for pod in pods.values():
        assert reaches(policies, pod, DNS, 53), pod.name
        assert not reaches(policies, pod, STRANGER, 443), pod.name


def test_network_model_sees_an_opened_path(rendered):
    # The evaluator must be able to fail: TorchServe admitting every namespace lets a stranger in.
    policies = copy.deepcopy(find(rendered["base"], "NetworkPolicy"))
    torchserve = pods_of(rendered["base"])["torchserve"]
    assert not reaches(policies, STRANGER, torchserve, 7070)
    one(policies, "NetworkPolicy", "torchserve")["spec"]["ingress"][0]["from"].append(
        {"namespaceSelector": {}}
    )
    assert reaches(policies, STRANGER, torchserve, 7070)
    # A pod of refit's namespace stays out: the default denial covers its egress too.
    assert not reaches(policies, INTRUDER, torchserve, 7070)


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
