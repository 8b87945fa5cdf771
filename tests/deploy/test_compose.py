"""docker-compose.yml: valid against the compose spec (offline), and the security properties
the deployment relies on."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.deploy.helpers import ROOT, assert_ok, run_tool

COMPOSE_FILE = ROOT / "docker-compose.yml"
INTERNAL_ONLY = ("torchserve", "minio", "trainer")  # never reachable from outside
REFIT_ROLES = ("torchserve", "trainer", "service")  # the project image
SECRET_NAME = re.compile(r"SECRET|PASSWORD|ACCESS_KEY|ROOT_USER|TOKEN", re.IGNORECASE)
REQUIRED_VARIABLE = re.compile(r"\$\{[A-Z_]+:\?[^}]+\}")


def validate(path: Path):
    return run_tool("check-jsonschema", "--builtin-schema", "vendor.compose-spec", path)


def test_matches_the_compose_spec():
    assert_ok(validate(COMPOSE_FILE))


def test_schema_check_rejects_an_invalid_file(tmp_path: Path):
    # The check above is only worth something if an unknown key fails it.
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("    read_only: true", "    readonly: true"))
    assert validate(broken).returncode != 0


def test_torchserve_publishes_no_port(compose):
    assert "ports" not in compose["services"]["torchserve"]
    assert "expose" not in compose["services"]["torchserve"]


def test_published_ports_are_bound_to_loopback(compose):
    published = [p for s in compose["services"].values() for p in s.get("ports", [])]
    assert published, "nothing published: the API would be unreachable"
    for port in published:
        assert isinstance(port, str) and port.startswith("127.0.0.1:"), port


def test_backend_components_are_on_internal_networks_only(compose):
    networks = compose["networks"]
    for name in INTERNAL_ONLY:
        attached = compose["services"][name]["networks"]
        assert attached and all(networks[n].get("internal") is True for n in attached), name
        assert "ports" not in compose["services"][name], name


def test_every_container_is_hardened(compose):
    for name, service in compose["services"].items():
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        assert service.get("cap_drop") == ["ALL"], name
        assert not service.get("privileged", False), name
    for name in REFIT_ROLES:
        assert compose["services"][name].get("read_only") is True, name


def test_secrets_come_only_from_required_variables(compose):
    for name, service in compose["services"].items():
        for key, value in service.get("environment", {}).items():
            if SECRET_NAME.search(key):
                assert REQUIRED_VARIABLE.fullmatch(str(value)), f"{name}.{key} is a literal"


def test_env_example_holds_only_placeholders():
    lines = (ROOT / ".env.example").read_text().splitlines()
    values = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    assert {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "GRAFANA_ADMIN_PASSWORD"} <= set(values)
    for key, value in values.items():
        assert value.startswith("change-me"), key
    # Every variable compose requires is documented there.
    required = set(re.findall(r"\$\{([A-Z_]+):\?", COMPOSE_FILE.read_text()))
    assert required <= set(values)


def test_secrets_stay_out_of_the_image():
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ".env" in ignored


def test_images_are_pinned(compose):
    for name, service in compose["services"].items():
        image = service["image"]
        if name in REFIT_ROLES:
            assert service["build"] == ".", name
            continue
        tag = image.rpartition(":")[2]
        assert ":" in image and tag not in {"latest", ""}, image


def test_startup_waits_for_dependencies(compose):
    services = compose["services"]
    assert services["service"]["depends_on"] == {
        "minio": {"condition": "service_healthy"},
        "torchserve": {"condition": "service_healthy"},
        "trainer": {"condition": "service_healthy"},
    }
    assert services["trainer"]["depends_on"] == {
        "minio": {"condition": "service_healthy"},
        "torchserve": {"condition": "service_healthy"},
    }
    for name, service in services.items():
        for dependency, how in service.get("depends_on", {}).items():
            if how["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits on {dependency}"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("REFIT_GRPC_ADDRESS", "0.0.0.0:50051"),
        ("REFIT_METRICS_ADDRESS", "0.0.0.0:9101"),
        ("REFIT_TORCHSERVE_INFERENCE", "torchserve:7070"),
        ("REFIT_TORCHSERVE_MANAGEMENT", "torchserve:7071"),
        ("MINIO_ENDPOINT", "http://minio:9000"),
        ("REFIT_TRAINER_ADDRESS", "trainer:50052"),
    ],
)
def test_service_reaches_its_dependencies(compose, key, value):
    assert compose["services"]["service"]["environment"][key] == value


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("REFIT_TRAINER_GRPC_ADDRESS", "0.0.0.0:50052"),
        ("REFIT_TRAINER_METRICS_ADDRESS", "0.0.0.0:9102"),
        ("REFIT_TORCHSERVE_INFERENCE", "torchserve:7070"),
        ("REFIT_TORCHSERVE_MANAGEMENT", "torchserve:7071"),
        ("REFIT_PUBLISH_BASE_MODEL", "true"),
        ("MINIO_ENDPOINT", "http://minio:9000"),
    ],
)
def test_trainer_is_a_long_running_server_that_publishes_the_base_model(compose, key, value):
    trainer = compose["services"]["trainer"]
    assert trainer["command"] == ["python", "-m", "trainer.server"]
    assert trainer["restart"] == "unless-stopped" and "healthcheck" in trainer
    assert trainer["environment"][key] == value


def test_trainer_gets_the_gpu_when_present(compose):
    devices = compose["services"]["trainer"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
