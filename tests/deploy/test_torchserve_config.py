"""deploy/torchserve/config.properties: the settings the service relies on, the SSRF allow-list,
and TorchServe actually starting with it (ports moved to free loopback ones)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.config import ServiceSettings
from tests.conftest import free_port, wait_for_port
from tests.deploy.helpers import ROOT

PROPERTIES = ROOT / "deploy" / "torchserve" / "config.properties"
OBJECT_STORE_URL = "http://minio:9000/refit/archives/imagenet/0123abcd.mar"
FORBIDDEN_URLS = [
    "file:///etc/passwd",
    "http://169.254.169.254/latest/meta-data/",  # cloud metadata
    "https://example.com/model.mar",
    "http://minio:9000.example.com/model.mar",
    "http://minio:9001/model.mar",
    "http://torchserve:8081/models",
]


def read_properties(path: Path = PROPERTIES) -> dict[str, str]:
    lines = path.read_text().splitlines()
    pairs = (line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def allowed(url: str, patterns: str) -> bool:
    # TorchServe matches the whole URL against each comma-separated regex, ignoring case.
    return any(re.fullmatch(p, url, re.IGNORECASE) for p in patterns.split(","))


def test_serving_settings():
    props = read_properties()
    assert props["metrics_mode"] == "prometheus"  # the default (log) serves an empty /metrics
    assert props["enable_model_api"] == "true"  # the service registers versions at run time
    assert "disable_token_authorization" not in props  # TorchServe's own: on
    assert props["grpc_inference_port"] == "7070"
    assert props["grpc_management_port"] == "7071"


def test_accepts_the_largest_image_the_service_admits():
    # Room for the request envelope around the image bytes.
    assert int(read_properties()["max_request_size"]) >= ServiceSettings().max_image_bytes + 65536


def test_allowed_urls_is_only_the_object_store():
    patterns = read_properties()["allowed_urls"]
    assert allowed(OBJECT_STORE_URL, patterns)
    for url in FORBIDDEN_URLS:
        assert not allowed(url, patterns), url


@pytest.fixture(scope="module")
def torchserve(tmp_path_factory) -> Iterator[dict]:
    """TorchServe started with the compose config, every listener moved to a free loopback port."""
    work = tmp_path_factory.mktemp("torchserve")
    ports = {name: free_port() for name in ("inference", "management", "metrics", "grpc", "grpcm")}
    props = read_properties()
    for name in ("inference", "management", "metrics"):
        assert props[f"{name}_address"].startswith("http://0.0.0.0:"), name
        props[f"{name}_address"] = f"http://127.0.0.1:{ports[name]}"
    for name, key in (("grpc", "grpc_inference"), ("grpcm", "grpc_management")):
        assert props[f"{key}_address"] == "0.0.0.0", key
        props[f"{key}_address"], props[f"{key}_port"] = "127.0.0.1", str(ports[name])
    config = work / "config.properties"
    config.write_text("".join(f"{key}={value}\n" for key, value in props.items()))
    (work / "store").mkdir()
    torchserve_bin = Path(sys.executable).with_name("torchserve")
    # TMPDIR keeps its pid file apart from any other TorchServe on this machine.
    env = {**os.environ, "TMPDIR": str(work), "LOG_LOCATION": str(work / "logs")}
    env["METRICS_LOCATION"] = env["LOG_LOCATION"]
    command = [str(torchserve_bin), "--start", "--foreground", "--ncs"]
    command += ["--ts-config", str(config), "--model-store", str(work / "store")]
    with (work / "stdout.log").open("w") as log:
        process = subprocess.Popen(command, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        for name in ports:
            wait_for_port(ports[name], timeout=60, process=process)
        yield {**ports, "keys": work / "key_file.json"}
    finally:
        subprocess.run([str(torchserve_bin), "--stop"], env=env, capture_output=True, timeout=30)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def http(method: str, url: str, key: str = "") -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    request = urllib.request.Request(url, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def management_key(torchserve: dict) -> str:
    return json.loads(torchserve["keys"].read_text())["management"]["key"]


@pytest.mark.integration
def test_metrics_are_in_prometheus_format(torchserve):
    status, body = http("GET", f"http://127.0.0.1:{torchserve['metrics']}/metrics")
    assert status == 200
    assert "# TYPE ts_inference_requests_total counter" in body
    for name in ("PredictionTime", "QueueTime"):  # what the dashboard reads for latency
        assert f"# TYPE {name} gauge" in body


@pytest.mark.integration
@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "models"), ("POST", f"models?url={OBJECT_STORE_URL}"), ("DELETE", "models/m/1")],
)
def test_management_refuses_a_caller_without_the_key(torchserve, method, path):
    """Reaching the management port is not enough: its token authorization is on."""
    url = f"http://127.0.0.1:{torchserve['management']}/{path}"
    for key in ("", "not-the-key"):
        status, body = http(method, url, key)
        assert status == 400 and "Token Authorization failed" in body, (key, status, body)


@pytest.mark.integration
@pytest.mark.parametrize("url", ["file:///etc/passwd", "http://127.0.0.1:9/model.mar"])
def test_registration_from_elsewhere_is_refused_even_with_the_key(torchserve, url):
    management = f"http://127.0.0.1:{torchserve['management']}"
    status, body = http("POST", f"{management}/models?url={url}", management_key(torchserve))
    # Not 405 (model API on): refused by allowed_urls.
    assert status == 404, body
    assert "does not match any allowed URL" in json.loads(body)["message"]
