"""Rendered Kubernetes manifests as data, and the invariants refit's deployment promises.

``problems`` returns every broken invariant as a sentence, so a test asserts it returns nothing
and the mutation tests assert it names what they broke. ``reaches`` evaluates NetworkPolicies
(the subset refit uses: label selectors, namespace selectors, numeric and named ports) the way
the API defines them: a connection needs an egress rule at the source and an ingress rule at the
destination whenever a policy of that type selects the pod.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tests.deploy.helpers import ROOT, find_tool

K8S_DIR = ROOT / "deploy" / "k8s"
NAMESPACE = "refit"
GPU = "nvidia.com/gpu"
IMAGES = {"refit-service", "refit-torchserve", "refit-trainer"}  # the Dockerfile's targets
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}
# Each layout a user applies, and whether its trainer gets a GPU; the extras, applied beside one.
LAYOUTS = {"base": False, "overlays/gpu": True}
EXTRAS = ["secrets-example", "minio-tenant"]
# Scrape jobs, named as the alert rules expect, and their metrics ports.
JOBS = {"refit-service": 9101, "torchserve": 8082, "refit-trainer": 9102}


def workload_container(objects: list[dict], workload: str) -> dict:
    return one(objects, "Deployment", workload)["spec"]["template"]["spec"]["containers"][0]


def render(layout: str) -> list[dict]:
    """`kubectl kustomize deploy/k8s/<layout>`, parsed."""
    result = subprocess.run(
        [find_tool("kubectl"), "kustomize", str(K8S_DIR / layout)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(objects: Iterable[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]


def one(objects: Iterable[dict], kind: str, name: str) -> dict:
    (found,) = find(objects, kind, name)
    return found


def pod_templates(objects: Iterable[dict]) -> Iterator[tuple[str, dict]]:
    """(workload name, pod template) for every workload."""
    for o in objects:
        if o["kind"] in WORKLOAD_KINDS:
            spec = o["spec"]
            if o["kind"] == "CronJob":
                spec = spec["jobTemplate"]["spec"]
            yield o["metadata"]["name"], spec["template"]


def containers(pod: dict) -> list[dict]:
    spec = pod["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def selects(selector: dict, labels: dict) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) against a set of labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


# --- invariants -------------------------------------------------------------------------------


def problems(objects: list[dict], *, gpu: bool) -> list[str]:
    """Every broken invariant of a rendered layout; ``gpu``: whether the trainer gets a GPU."""
    found = []
    for name, pod in pod_templates(objects):
        found += [f"{name}: {p}" for p in pod_problems(pod)]
        found += [f"{name}: {p}" for p in gpu_problems(name, pod, gpu=gpu)]
    found += service_problems(objects)
    found += autoscaling_problems(objects)
    found += network_policy_problems(objects)
    return found


def pod_problems(pod: dict) -> Iterator[str]:
    spec = pod["spec"]
    security = spec.get("securityContext", {})
    if security.get("runAsNonRoot") is not True:
        yield "pod securityContext.runAsNonRoot is not true"
    if security.get("runAsUser", 0) == 0:
        yield "pod securityContext.runAsUser is not a non-root numeric uid"
    if security.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        yield "pod has no RuntimeDefault seccomp profile"
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            yield f"pod sets {key}"
    if spec.get("automountServiceAccountToken") is not False:
        yield "pod mounts a service account token"
    for volume in spec.get("volumes", []):
        if "hostPath" in volume:
            yield f"volume {volume['name']} is a hostPath"
    for c in containers(pod):
        yield from (f"container {c['name']}: {p}" for p in container_problems(c))
    if pod["metadata"].get("annotations", {}).get("prometheus.io/scrape") != "true":
        yield "pod is not annotated for Prometheus (prometheus.io/scrape)"


def container_problems(c: dict) -> Iterator[str]:
    security = c.get("securityContext", {})
    if security.get("privileged"):
        yield "privileged"
    if security.get("allowPrivilegeEscalation") is not False:
        yield "allowPrivilegeEscalation is not false"
    if security.get("readOnlyRootFilesystem") is not True:
        yield "root filesystem is writable"
    if security.get("capabilities", {}).get("drop") != ["ALL"]:
        yield "does not drop ALL capabilities"
    if security.get("capabilities", {}).get("add"):
        yield "adds capabilities"
    if security.get("runAsUser") == 0:
        yield "runs as root"
    resources = c.get("resources", {})
    for kind in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            if resource not in resources.get(kind, {}):
                yield f"no {resource} {kind[:-1]}"
    for probe in ("readinessProbe", "livenessProbe"):
        if probe not in c:
            yield f"no {probe}"
    if c["image"].split(":")[0].rsplit("/", 1)[-1] not in IMAGES:
        yield f"image {c['image']} is not one of refit's"


def gpu_problems(name: str, pod: dict, *, gpu: bool) -> Iterator[str]:
    """A GPU for the trainer in the gpu overlay, and for no one else anywhere."""
    for c in containers(pod):
        resources = c.get("resources", {})
        wanted = gpu and name == "refit-trainer"
        has = GPU in resources.get("limits", {})
        if has and not wanted:
            yield f"container {c['name']} requests a GPU"
        if wanted and int(resources.get("limits", {}).get(GPU, 0)) < 1:
            yield f"container {c['name']} has no {GPU} limit"


def named_ports(pod: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in containers(pod) for p in c.get("ports", [])}


def container_ports(pod: dict) -> set[int]:
    return set(named_ports(pod).values())


def service_problems(objects: list[dict]) -> Iterator[str]:
    """Every Service selects pods and targets ports they declare (ExternalName excepted)."""
    pods = [pod for _, pod in pod_templates(objects)]
    for service in find(objects, "Service"):
        name, spec = service["metadata"]["name"], service["spec"]
        if spec.get("type") == "ExternalName":
            continue
        selected = [p for p in pods if selects({"matchLabels": spec["selector"]}, labels(p))]
        if not selected:
            yield f"Service {name} selects no pod"
        for port in spec["ports"]:
            target = port.get("targetPort", port["port"])
            for pod in selected:
                if target not in named_ports(pod) and target not in container_ports(pod):
                    yield f"Service {name} targets port {target}, which its pods do not declare"


def autoscaling_problems(objects: list[dict]) -> Iterator[str]:
    for hpa in find(objects, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        if not find(objects, ref["kind"], ref["name"]):
            yield f"HPA {hpa['metadata']['name']} targets a missing {ref['kind']} {ref['name']}"
        elif "replicas" in one(objects, ref["kind"], ref["name"])["spec"]:
            yield f"{ref['name']} sets replicas, which the HPA owns"


def labels(pod: dict) -> dict:
    return pod["metadata"].get("labels", {})


def network_policy_problems(objects: list[dict]) -> Iterator[str]:
    """Selectors that select nothing are typos that silently open or close a path."""
    pods = [pod for _, pod in pod_templates(objects)]
    for policy in find(objects, "NetworkPolicy"):
        name, spec = policy["metadata"]["name"], policy["spec"]
        selected = [p for p in pods if selects(spec["podSelector"], labels(p))]
        if not selected:
            yield f"NetworkPolicy {name} selects no pod"
        for direction, peers_key in (("ingress", "from"), ("egress", "to")):
            for rule in spec.get(direction, []):
                for peer in rule.get(peers_key, []):
                    local = "podSelector" in peer and "namespaceSelector" not in peer
                    if local and not any(selects(peer["podSelector"], labels(p)) for p in pods):
                        yield f"NetworkPolicy {name}: an {direction} peer selects no pod"
                # Named ports resolve on the destination: the selected pods, for ingress.
                named = [p["port"] for p in rule.get("ports", []) if isinstance(p["port"], str)]
                for port in named if direction == "ingress" else []:
                    if any(port not in named_ports(pod) for pod in selected):
                        yield f"NetworkPolicy {name} names port {port}, which a pod lacks"


# --- NetworkPolicy evaluation -----------------------------------------------------------------


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    labels: dict
    ports: dict[str, int] = field(default_factory=dict)  # named container ports

    @property
    def namespace_labels(self) -> dict:
        return {"kubernetes.io/metadata.name": self.namespace}


def pods_of(objects: list[dict], namespace: str = NAMESPACE) -> dict[str, Pod]:
    return {
        name: Pod(name, namespace, labels(pod), named_ports(pod))
        for name, pod in pod_templates(objects)
    }


def _peer_matches(peer: dict, policy_namespace: str, pod: Pod) -> bool:
    if "ipBlock" in peer:
        return False  # refit's peers are pods; CIDRs name nothing in this model
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], pod.namespace_labels):
            return False
    elif pod.namespace != policy_namespace:
        return False
    return selects(peer.get("podSelector", {}), pod.labels)


def _port_matches(rule_ports: list[dict], port: int, target: Pod) -> bool:
    if not rule_ports:
        return True
    for p in rule_ports:
        wanted = p.get("port")
        if wanted is None or wanted == port or target.ports.get(wanted) == port:
            return True
    return False


def _allowed(
    policies: list[dict], subject: Pod, direction: str, other: Pod, port: int, target: Pod
) -> bool:
    """Whether the policies of ``subject``'s namespace let ``other`` through in ``direction``."""
    kind, peers_key = ("Ingress", "from") if direction == "ingress" else ("Egress", "to")
    applying = [
        p
        for p in policies
        if p["metadata"].get("namespace", subject.namespace) == subject.namespace
        and selects(p["spec"]["podSelector"], subject.labels)
        and kind in p["spec"].get("policyTypes", ["Ingress"])
    ]
    if not applying:
        return True  # no policy of this type selects the pod: all allowed
    for policy in applying:
        namespace = policy["metadata"].get("namespace", subject.namespace)
        for rule in policy["spec"].get(direction, []):
            peers = rule.get(peers_key, [])
            if (not peers or any(_peer_matches(peer, namespace, other) for peer in peers)) and (
                _port_matches(rule.get("ports", []), port, target)
            ):
                return True
    return False


def reaches(policies: list[dict], source: Pod, target: Pod, port: int) -> bool:
    return _allowed(policies, source, "egress", target, port, target) and _allowed(
        policies, target, "ingress", source, port, target
    )


# --- Prometheus relabelling -------------------------------------------------------------------


def _label_name(key: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", key)


def pod_targets(pod: dict, address: str = "10.0.0.7") -> list[dict[str, str]]:
    """The targets Kubernetes service discovery (role: pod) makes of a pod: one per port."""
    meta = pod["metadata"]
    base = {"__meta_kubernetes_pod_name": "pod-0", "__metrics_path__": "/metrics"}
    for key, value in meta.get("labels", {}).items():
        base[f"__meta_kubernetes_pod_label_{_label_name(key)}"] = value
    for key, value in meta.get("annotations", {}).items():
        base[f"__meta_kubernetes_pod_annotation_{_label_name(key)}"] = value
    return [{**base, "__address__": f"{address}:{port}"} for port in container_ports(pod)]


def relabel(target: dict[str, str], configs: list[dict]) -> dict[str, str] | None:
    """Prometheus' relabelling (keep, drop, replace); None when the target is dropped."""
    target = dict(target)
    for config in configs:
        separator = config.get("separator", ";")
        value = separator.join(target.get(s, "") for s in config.get("source_labels", []))
        match = re.fullmatch(config.get("regex", "(.*)"), value)
        action = config.get("action", "replace")
        if action == "keep" and not match:
            return None
        if action == "drop" and match:
            return None
        if action == "replace" and match:
            replacement = re.sub(r"\$(\d+)", r"\\\1", config.get("replacement", "$1"))
            target[config["target_label"]] = match.expand(replacement)
    return target


def load(path: Path) -> dict:
    with path.open() as f:
        return yaml.safe_load(f)
