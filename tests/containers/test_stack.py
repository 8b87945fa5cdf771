"""The compose stack on a real Docker engine, checked from the host through the published ports.

Every image is built from this checkout (Dockerfile targets service, torchserve, trainer) and
the stack runs docker-compose.yml with docker-compose.test.yml, which replaces only images this
machine cannot obtain (MinIO by a local S3 server image, Prometheus by Debian's; Grafana is not
started). Two service replicas (each on a port of its own) and two TorchServe replicas run, as
in the Kubernetes base; the object store is a stand-in that enforces each component's MinIO
policy (deploy/containers/test/). Run by `make test-containers`, never by `make test`: it needs
an engine, and about 20 minutes on two loaded cores with no build cache, 4 with one
(docs/benchmarks.md, "Containers"). The tests run in file order on one stack, this module before
test_stack_under_faults.py; the stack fixture checks that `down -v` leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.containers.chaos import colour_dataset, colour_image
from deploy.containers.stack import ComposeStack, docker

pytestmark = [pytest.mark.containers, pytest.mark.timeout(3600)]

REFIT_IMAGES = ("refit-service:local", "refit-torchserve:local", "refit-trainer:local")
SERVICE_IMAGE_LIMIT_MB = 400
# Containers of the long-running services (the one-shot jobs have exited by now).
RUNNING = ("minio", "torchserve", "trainer-cpu", "service", "prometheus")
NO_HOST_PORTS = ("minio", "torchserve", "trainer-cpu")
COFFEE_LABELS = {"espresso", "cup", "coffee mug"}
# After TorchServe's main process is killed: Docker restarts it, TorchServe starts, and the
# service's reconciler (every REFIT_RECONCILE_INTERVAL_S = 30 s) registers every version again.
RECOVERY_BOUND_S = 180
CLASSES = {"red": (200, 30, 30), "blue": (30, 30, 200)}
IMAGES_PER_CLASS = 8

REFIT_CLI = str(Path(sys.executable).with_name("refit"))
# Stock tritonclient, in a virtual environment of its own (make install): it pins protobuf < 7.
OIP_PYTHON = Path(".venv-oip/bin/python")
TRITON_SCRIPT = Path(__file__).parents[1] / "service" / "oip_client" / "triton_infer.py"
# Run inside a TorchServe container: the models its management API lists, asked with the
# replica's own management key (its token authorization is on).
LIST_MODELS = (
    "import json, urllib.request; "
    "key = json.load(open('/tmp/key_file.json'))['management']['key']; "
    "request = urllib.request.Request('http://127.0.0.1:8081/models', "
    "headers={'Authorization': 'Bearer ' + key}); "
    "print(json.load(urllib.request.urlopen(request))['models'])"
)


def refit(stack: ComposeStack, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The refit CLI on the host, against the stack's published port, as an admin."""
    return subprocess.run(
        [REFIT_CLI, *args],
        env={**os.environ, **stack.cli_env()},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def image_megabytes(image: str) -> float:
    return json.loads(docker("image", "inspect", image))[0]["Size"] / 1e6


def test_service_image_holds_no_torch_and_is_small(stack, figures):
    for image in REFIT_IMAGES:
        figures[f"image {image}"] = f"{image_megabytes(image):,.0f} MB"
    probe = "import importlib.util as u; print(u.find_spec('torch') is None)"
    assert docker("run", "--rm", REFIT_IMAGES[0], "python", "-c", probe).strip() == "True"
    assert image_megabytes(REFIT_IMAGES[0]) <= SERVICE_IMAGE_LIMIT_MB


@pytest.mark.parametrize("image", REFIT_IMAGES)
def test_images_run_as_numeric_non_root_users_with_healthchecks(stack, image):
    config = json.loads(docker("image", "inspect", image))[0]["Config"]
    user = config["User"].split(":")[0]
    assert user.isdigit() and user != "0", config["User"]
    assert config["Healthcheck"]["Test"][0] == "CMD", config["Healthcheck"]


def test_health_is_serving_through_every_replica(stack):
    assert len(stack.addresses) == 2 and len(set(stack.addresses)) == 2, stack.addresses
    for address in stack.addresses:
        with grpc.insecure_channel(address) as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        assert answer.status == health_pb2.HealthCheckResponse.SERVING, address


def test_both_service_replicas_predict_through_both_torchserve_replicas(stack, coffee_jpeg):
    assert len(stack.containers("torchserve")) == 2
    for address in stack.addresses:
        answer = stack.predict(coffee_jpeg, address=address)
        assert {p.label for p in answer.predictions} & COFFEE_LABELS, address
    for index in (1, 2):  # every replica holds the base model: the reconciler registered it
        container = stack.container("torchserve", index)
        models = docker("exec", container, "python", "-c", LIST_MODELS)
        assert "imagenet" in models, (index, models)


def test_stock_tritonclient_infers_through_every_replica(stack, coffee_jpeg, tmp_path):
    """The Open Inference Protocol on the API port, same tokens (docs/inference-protocol.md)."""
    assert OIP_PYTHON.exists(), "no .venv-oip: `make install` creates it"
    photo = tmp_path / "coffee.jpg"
    photo.write_bytes(coffee_jpeg)
    for address in stack.addresses:
        for token in (stack.predict_token, ""):
            script = [str(OIP_PYTHON), str(TRITON_SCRIPT), address, token, "imagenet", str(photo)]
            run = subprocess.run(script, capture_output=True, text=True, timeout=120)
            assert run.returncode == 0, run.stderr
            answer = json.loads(run.stdout)
            if token:
                assert answer.get("live") and set(answer["labels"][0]) & COFFEE_LABELS, answer
            else:
                assert answer.get("error") == "StatusCode.UNAUTHENTICATED", answer


def test_cli_predicts_the_coffee_photo(stack, coffee_jpeg, tmp_path):
    photo = tmp_path / "coffee.jpg"
    photo.write_bytes(coffee_jpeg)
    result = refit(stack, "predict", str(photo), "--json")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    top5 = {p["label"] for p in answer["predictions"]}
    assert top5 & COFFEE_LABELS, top5
    assert (answer["model"], answer["version"]) == ("imagenet", "1")


def test_torchserve_refuses_management_calls_without_its_key(stack):
    """From the service's container (on the backend network): reaching the port is not enough."""
    probe = (
        "import urllib.request, urllib.error\n"
        "try:\n"
        "    urllib.request.urlopen('http://torchserve:8081/models', timeout=10)\n"
        "    print('open')\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code, e.read().decode())\n"
    )
    answer = docker("exec", stack.container("service", 1), "python", "-c", probe)
    assert answer.startswith("400") and "Token Authorization failed" in answer, answer


def test_containers_run_as_non_root(stack):
    for service in RUNNING:
        for container in stack.containers(service):
            uid = docker("exec", container, "id", "-u").strip()
            assert uid.isdigit() and uid != "0", f"{service} runs as uid {uid}"


def test_only_the_api_and_prometheus_are_published_on_loopback(stack):
    for service in NO_HOST_PORTS:
        for container in stack.containers(service):
            ports = stack.inspect(container)["NetworkSettings"]["Ports"] or {}
            assert all(binding is None for binding in ports.values()), f"{service}: {ports}"
    published = [
        (stack.container("service", n), "50051/tcp", address.rsplit(":", 1)[1])
        for n, address in enumerate(stack.addresses, start=1)
    ] + [(stack.container("prometheus"), "9090/tcp", str(stack.prometheus_port))]
    for container, port, host_port in published:
        ports = stack.inspect(container)["NetworkSettings"]["Ports"]
        bound = [b for bindings in ports.values() if bindings for b in bindings]
        assert bound == [{"HostIp": "127.0.0.1", "HostPort": host_port}], ports
        assert ports[port] == bound


def test_prometheus_scrapes_every_replica(stack):
    """Every replica of the service and of TorchServe is a target (DNS discovery), and up."""
    expected = {"refit-service": ["up", "up"], "refit-trainer": ["up"], "torchserve": ["up", "up"]}
    deadline = time.monotonic() + 120  # discovery every 10 s, the first scrape within 15 s
    while True:
        with urllib.request.urlopen(f"{stack.prometheus_url}/api/v1/targets", timeout=10) as r:
            targets = json.load(r)["data"]["activeTargets"]
        health: dict[str, list[str]] = {}
        for target in targets:
            health.setdefault(target["labels"]["job"], []).append(target["health"])
        if health == expected or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert health == expected


def test_minio_init_created_the_buckets(stack):
    buckets = {b["Name"] for b in json.loads(stack.aws("s3api", "list-buckets"))["Buckets"]}
    assert {"refit", "datasets", "models"} <= buckets


# Run in a component's container, with its own store identity (its MINIO_* environment).
STORE_PROBE = """
from refit.storage import AccessDenied, StorageSettings
store = StorageSettings.from_env().open()
for what, call in {CALLS}.items():
    try:
        call(store)
        print(what, "allowed")
    except AccessDenied:
        print(what, "refused")
"""


def test_the_components_reach_the_store_as_their_own_identities(stack):
    """The stand-in enforces minio-init's policies: each component may do its own part only."""
    service = STORE_PROBE.replace(
        "{CALLS}",
        """{
        "registry": lambda s: list(s.list("refit", "registry/")),
        "datasets": lambda s: list(s.list("datasets")),
        "write archives": lambda s: s.put("refit", "archives/x/y.mar", b"x"),
    }""",
    )
    answer = docker("exec", stack.container("service", 1), "python", "-c", service).split("\n")
    assert answer[:3] == ["registry allowed", "datasets refused", "write archives refused"]
    trainer = STORE_PROBE.replace(
        "{CALLS}",
        """{
        "datasets": lambda s: list(s.list("datasets")),
        "write outside its prefixes": lambda s: s.put("refit", "elsewhere/x", b"x"),
    }""",
    )
    answer = docker("exec", stack.container("trainer-cpu"), "python", "-c", trainer).split("\n")
    assert answer[:2] == ["datasets allowed", "write outside its prefixes refused"]


def test_retrain_from_uploaded_images_publishes_a_new_version(stack, tmp_path, figures):
    dataset = colour_dataset(tmp_path / "colours", CLASSES, IMAGES_PER_CLASS)
    stack.aws("s3", "cp", "--recursive", "--only-show-errors", "/data", "s3://datasets/colours",
              mount=dataset)  # fmt: skip
    listed = stack.aws("s3", "ls", "--recursive", "s3://datasets/colours/")
    assert len(listed.splitlines()) == len(CLASSES) * IMAGES_PER_CLASS

    started = time.monotonic()
    result = refit(
        stack, "retrain", "--model", "colours", "--dataset", "s3://datasets/colours",
        "--epochs", "1", "--crop-size", "64", "--batch-size", "8", "--watch", "--json",
        timeout=1200,
    )  # fmt: skip
    figures["retrain (1 epoch, 16 images) Retrain to SUCCEEDED"] = (
        f"{time.monotonic() - started:.0f} s"
    )
    events = [json.loads(line) for line in result.stdout.splitlines()]
    job = events[-1]["job"] if events else {}
    assert result.returncode == 0 and job.get("state") == "SUCCEEDED", (result.stderr, job)

    red = tmp_path / "red.png"
    red.write_bytes(colour_image(CLASSES["red"]))
    predicted = refit(stack, "predict", str(red), "--model", "colours", "--json")
    assert predicted.returncode == 0, predicted.stderr
    answer = json.loads(predicted.stdout)
    assert (answer["model"], answer["version"]) == ("colours", job["version"])
    assert {p["label"] for p in answer["predictions"]} == set(CLASSES)


def test_torchserve_restarts_by_policy_after_a_crash(stack, coffee_jpeg, figures):
    # Docker treats `docker kill` as an operator's stop and never restarts after it (any
    # policy); a crash is its main process dying, as the kernel's OOM killer would do it.
    container = stack.container("torchserve", 1)
    before = stack.inspect(container)
    os.kill(before["State"]["Pid"], signal.SIGKILL)
    killed = time.monotonic()
    deadline = killed + RECOVERY_BOUND_S
    while stack.inspect(container)["RestartCount"] == before["RestartCount"]:
        assert time.monotonic() < deadline, "Docker did not restart TorchServe"
        time.sleep(0.5)
    figures["TorchServe restarted by Docker after"] = f"{time.monotonic() - killed:.1f} s"
    answer = stack.wait_until_predicts(coffee_jpeg, timeout=deadline - time.monotonic())
    recovered = time.monotonic() - killed
    figures["Predict answers again after the TorchServe crash"] = f"{recovered:.0f} s"
    assert answer.version == "1" and recovered < RECOVERY_BOUND_S
