"""docker-compose.yml and the container test's override: valid against the compose spec
(offline), the security properties the deployment relies on, and an override that replaces
only the images the test machine cannot obtain. tests/containers/ runs the stack for real."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.deploy.helpers import ROOT, assert_ok, load_yaml, run_tool

COMPOSE_FILE = ROOT / "docker-compose.yml"
TEST_OVERRIDE = ROOT / "docker-compose.test.yml"
TRAINERS = ("trainer", "trainer-cpu")  # the gpu and cpu profiles of one component
JOBS = ("minio-init", "base-model")  # one-shot containers
INTERNAL_ONLY = ("torchserve", "minio", *TRAINERS, *JOBS)  # never reachable from outside
# Compose service -> the Dockerfile target it runs.
REFIT_TARGETS = {
    "service": "service",
    "minio-init": "service",
    "torchserve": "torchserve",
    "base-model": "trainer",
    "trainer": "trainer",
    "trainer-cpu": "trainer",
}
# Access keys are user names (refit-service, refit-trainer), not secrets.
SECRET_NAME = re.compile(r"SECRET|PASSWORD|ROOT_USER|TOKEN", re.IGNORECASE)
REQUIRED_VARIABLE = re.compile(r"\$\{[A-Z_]+:\?[^}]+\}")
ROOT_CREDENTIALS = ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD")


def validate(path: Path):
    return run_tool("check-jsonschema", "--builtin-schema", "vendor.compose-spec", path)


@pytest.mark.parametrize("path", [COMPOSE_FILE, TEST_OVERRIDE])
def test_matches_the_compose_spec(path):
    assert_ok(validate(path))


def test_schema_check_rejects_an_invalid_file(tmp_path: Path):
    # The check above is only worth something if an unknown key fails it.
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("    read_only: true", "    readonly: true"))
    assert validate(broken).returncode != 0


def test_no_top_level_name_compose_v1_would_refuse(compose):
    # Compose v1 (docker-compose 1.29) rejects it; .env sets COMPOSE_PROJECT_NAME instead.
    assert "name" not in compose


def test_torchserve_publishes_no_port(compose):
    assert "ports" not in compose["services"]["torchserve"]
    assert "expose" not in compose["services"]["torchserve"]


def test_published_ports_are_bound_to_loopback(compose):
    published = {n: s["ports"] for n, s in compose["services"].items() if "ports" in s}
    assert set(published) == {"service", "prometheus", "grafana"}
    for ports in published.values():
        for port in ports:
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
    for name in REFIT_TARGETS:
        assert compose["services"][name].get("read_only") is True, name


def test_secrets_come_only_from_required_variables(compose):
    for name, service in compose["services"].items():
        for key, value in service.get("environment", {}).items():
            if SECRET_NAME.search(key):
                assert REQUIRED_VARIABLE.fullmatch(str(value)), f"{name}.{key} is a literal"


def test_root_credentials_reach_only_minio_and_its_init_job(compose):
    holders = {
        name
        for name, service in compose["services"].items()
        for value in service.get("environment", {}).values()
        if any(f"${{{c}:" in str(value) for c in ROOT_CREDENTIALS)
    }
    assert holders == {"minio", "minio-init"}


def test_each_component_has_its_own_object_store_identity(compose):
    services = compose["services"]
    assert services["service"]["environment"]["MINIO_ACCESS_KEY"] == "refit-service"
    for name in (*TRAINERS, "base-model"):
        assert services[name]["environment"]["MINIO_ACCESS_KEY"] == "refit-trainer", name


def test_env_example_holds_only_placeholders_for_secrets():
    lines = (ROOT / ".env.example").read_text().splitlines()
    values = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    secrets = {key for key in values if SECRET_NAME.search(key)}
    assert {*ROOT_CREDENTIALS, "REFIT_ADMIN_TOKEN", "REFIT_PREDICT_TOKEN"} <= secrets
    for key in secrets:
        assert values[key].startswith("change-me"), key
    assert values["COMPOSE_PROFILES"] in {"gpu", "cpu"}
    # Every variable compose requires is documented there.
    required = set(re.findall(r"\$\{([A-Z_]+):\?", COMPOSE_FILE.read_text()))
    assert required <= set(values)


def test_the_build_context_is_an_allow_list_without_secrets():
    rules = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert rules[0] == "*", "everything is excluded unless re-included"
    included = [rule[1:] for rule in rules if rule.startswith("!")]
    for path in (".env", ".git", ".venv", ".refit"):
        assert not any(path == i.rstrip("/") or path.startswith(i) for i in included), path


def test_refit_images_are_dockerfile_targets_and_others_are_pinned(compose):
    for name, service in compose["services"].items():
        if name in REFIT_TARGETS:
            target = REFIT_TARGETS[name]
            assert service["build"]["context"] == "." and service["build"]["target"] == target
            assert service["image"].startswith(f"refit-{target}:"), name
            continue
        tag = service["image"].rpartition(":")[2]
        assert ":" in service["image"] and tag not in {"latest", ""}, service["image"]


def test_startup_waits_for_dependencies(compose):
    services = compose["services"]
    completed = {"condition": "service_completed_successfully"}
    healthy = {"condition": "service_healthy"}
    assert services["minio-init"]["depends_on"] == {"minio": healthy}
    assert services["base-model"]["depends_on"] == {"minio-init": completed}
    assert services["service"]["depends_on"] == {
        "minio-init": completed,
        "base-model": completed,
        "torchserve": healthy,
    }
    for name in TRAINERS:
        assert services[name]["depends_on"] == {"minio-init": completed, "torchserve": healthy}


def test_what_is_waited_on_has_a_healthcheck(compose):
    # refit's images carry a HEALTHCHECK (tests/deploy/test_dockerfile.py); others need one here.
    services = compose["services"]
    for name, service in services.items():
        for dependency, how in service.get("depends_on", {}).items():
            if how["condition"] == "service_healthy" and dependency not in REFIT_TARGETS:
                assert "test" in services[dependency]["healthcheck"], f"{name} -> {dependency}"


def test_jobs_run_once_and_servers_restart(compose):
    for name, service in compose["services"].items():
        if name in JOBS:
            assert service["restart"] == "no" and service["healthcheck"] == {"disable": True}
        else:
            assert service["restart"] == "unless-stopped", name


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("REFIT_GRPC_ADDRESS", "0.0.0.0:50051"),
        ("REFIT_HEALTH_ADDRESS", "0.0.0.0:50054"),  # the image's HEALTHCHECK probes it
        ("REFIT_METRICS_ADDRESS", "0.0.0.0:9101"),
        ("REFIT_TORCHSERVE_INFERENCE", "dns:///torchserve:7070"),
        ("REFIT_TORCHSERVE_MANAGEMENT", "dns:///torchserve:7071"),
        ("REFIT_TORCHSERVE_MANAGEMENT_REST", "dns:///torchserve:8081"),
        # TorchServe's inference counters: idleness judged from every service replica's use
        ("REFIT_TORCHSERVE_METRICS", "dns:///torchserve:8082"),
        ("MINIO_ENDPOINT", "http://minio:9000"),
        ("REFIT_TRAINER_ADDRESS", "trainer:50052"),
    ],
)
def test_service_reaches_its_dependencies(compose, key, value):
    assert compose["services"]["service"]["environment"][key] == value


def test_service_gets_the_tokens_from_env(compose):
    environment = compose["services"]["service"]["environment"]
    for key in ("REFIT_ADMIN_TOKEN", "REFIT_PREDICT_TOKEN"):
        assert environment[key].startswith(f"${{{key}:?"), key


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("REFIT_TRAINER_GRPC_ADDRESS", "0.0.0.0:50052"),
        ("REFIT_TRAINER_HEALTH_ADDRESS", "0.0.0.0:50053"),  # the image's HEALTHCHECK probes it
        ("REFIT_TRAINER_METRICS_ADDRESS", "0.0.0.0:9102"),
        ("REFIT_TORCHSERVE_INFERENCE", "dns:///torchserve:7070"),
        ("REFIT_TORCHSERVE_MANAGEMENT", "dns:///torchserve:7071"),
        ("MINIO_ENDPOINT", "http://minio:9000"),
    ],
)
def test_both_trainer_profiles_are_the_same_long_running_server(compose, key, value):
    for name in TRAINERS:
        trainer = compose["services"][name]
        assert trainer["command"] == ["python", "-m", "trainer.server"]
        assert trainer["environment"][key] == value
        # The name the service and Prometheus use, whichever profile runs.
        assert trainer["networks"] == {"backend": {"aliases": ["trainer"]}}


def test_the_trainer_profiles_differ_only_by_the_gpu(compose):
    gpu, cpu = (dict(compose["services"][name]) for name in TRAINERS)
    assert (gpu.pop("profiles"), cpu.pop("profiles")) == (["gpu"], ["cpu"])
    devices = gpu.pop("deploy")["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert gpu == cpu


def test_the_base_model_is_published_by_a_one_shot_job(compose):
    job = compose["services"]["base-model"]
    assert job["command"] == ["python", "-m", "trainer.base_model"]
    assert "profiles" not in job  # Predict needs it whichever trainer runs


# --- the container test's override -----------------------------------------------------------

# What the override may change per service: images that cannot be obtained on the test machine,
# and how images build (the host network, for a loopback package mirror). minio-init runs as in
# production, identities and policies included: the S3 stand-in serves MinIO's admin calls.
ALLOWED_OVERRIDES = {
    "minio": {"image", "build", "command", "healthcheck"},
    "prometheus": {"image", "build"},
    "grafana": {"profiles"},
}


def test_the_override_replaces_only_unobtainable_images(compose):
    override = load_yaml(TEST_OVERRIDE)["services"]
    for name, changes in override.items():
        assert name in compose["services"], name
        assert set(changes) <= ALLOWED_OVERRIDES.get(name, {"build"}), name
        if name in REFIT_TARGETS:
            assert changes["build"] == {"network": "host"}, name
    assert override["grafana"]["profiles"] == ["grafana-image-unavailable"]
