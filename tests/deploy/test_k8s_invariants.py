"""deploy/k8s's invariants (tests/deploy/k8s_model.py's ``problems``): hardened pods, probes,
resources, a GPU only where asked; and the checker catches each broken one."""

import copy
import re

import pytest

from tests.deploy.helpers import ROOT
from tests.deploy.k8s_model import (
    GPU,
    LAYOUTS,
    one,
    pod_problems,
    pod_templates,
    problems,
)

# --- invariants -------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_invariants_hold(rendered, layout):
    assert problems(rendered[layout], gpu=LAYOUTS[layout]) == []


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
