"""deploy/k8s's NetworkPolicies allow exactly the documented paths (tests/deploy/k8s_model.py's
``reaches``), and the model sees a path that a change opens."""

import copy

import pytest

from tests.deploy.k8s_model import (
    JOBS,
    Pod,
    find,
    one,
    pods_of,
    reaches,
)

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
