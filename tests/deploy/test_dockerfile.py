"""The Dockerfile: hadolint-clean, one target per role, each final image non-root with a
HEALTHCHECK, pip only in builder stages, pins from pyproject.toml, generated code built from
the .proto files. tests/containers/ builds and runs the images for real."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.deploy.helpers import ROOT, assert_ok, run_tool

DOCKERFILE = ROOT / "Dockerfile"
TEST_DOCKERFILES = sorted((ROOT / "deploy" / "containers" / "test").glob("*.Dockerfile"))
TARGETS = ("service", "torchserve", "trainer")


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, args = line.partition(" ")
            pairs.append((keyword.upper(), args.strip()))
    return pairs


def stages() -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """Stage name -> (the stage it is built FROM, its instructions)."""
    found: dict[str, tuple[str, list]] = {}
    current: list | None = None
    for keyword, args in instructions():
        if keyword == "FROM":
            parent, _, name = args.partition(" AS ")
            current = []
            found[name.strip()] = (parent.strip(), current)
        elif current is not None:
            current.append((keyword, args))
    return found


def lineage(name: str) -> list[str]:
    """The stage and the stages it is built from, nearest first."""
    chain = []
    while name in stages():
        chain.append(name)
        name = stages()[name][0]
    return chain


@pytest.mark.parametrize("path", [DOCKERFILE, *TEST_DOCKERFILES], ids=lambda p: p.name)
def test_hadolint_finds_nothing(path):
    assert_ok(run_tool("hadolint", path))


def test_hadolint_reports_findings(tmp_path: Path):
    # The check above is only worth something if hadolint fails on findings.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install requests\n")
    assert run_tool("hadolint", bad).returncode != 0


def test_the_base_image_is_the_official_one_unless_overridden():
    assert ("ARG", "BASE_IMAGE=python:3.11-slim-bookworm") in instructions()
    assert stages()["base"][0] == "${BASE_IMAGE}"


@pytest.mark.parametrize("target", TARGETS)
def test_targets_run_as_a_numeric_non_root_user_with_a_healthcheck(target):
    steps = stages()[target][1]
    user = [args for keyword, args in steps if keyword == "USER"][-1].split(":")[0]
    assert user.isdigit() and user != "0", "numeric, so runtimes can verify it is not root"
    assert any(keyword == "HEALTHCHECK" for keyword, _ in steps)
    assert any(keyword == "CMD" for keyword, _ in steps)


def test_the_service_image_probes_health_on_its_own_port():
    # No API call, authenticated or not, can keep this probe waiting (issue 25).
    steps = stages()["service"][1]
    env = " ".join(args for keyword, args in steps if keyword == "ENV").split()
    assert {"REFIT_HEALTH_ADDRESS=0.0.0.0:50054", "REFIT_GRPC_ADDRESS=0.0.0.0:50051"} <= set(env)
    exposed = " ".join(args for keyword, args in steps if keyword == "EXPOSE").split()
    assert {"50051", "50054"} <= set(exposed)
    (probe,) = [args for keyword, args in steps if keyword == "HEALTHCHECK"]
    assert probe.endswith('healthcheck.py", "grpc", "env:REFIT_HEALTH_ADDRESS"]')


def test_the_trainer_image_probes_health_on_its_own_port():
    # The job API's threads and streams cannot keep this probe waiting (issue 23).
    steps = stages()["trainer"][1]
    env = " ".join(args for keyword, args in steps if keyword == "ENV").split()
    assert "REFIT_TRAINER_HEALTH_ADDRESS=0.0.0.0:50053" in env
    assert "REFIT_TRAINER_GRPC_ADDRESS=0.0.0.0:50052" in env
    exposed = " ".join(args for keyword, args in steps if keyword == "EXPOSE").split()
    assert {"50052", "50053"} <= set(exposed)
    (probe,) = [args for keyword, args in steps if keyword == "HEALTHCHECK"]
    assert probe.endswith('healthcheck.py", "grpc", "env:REFIT_TRAINER_HEALTH_ADDRESS"]')


@pytest.mark.parametrize("target", TARGETS)
def test_pip_and_its_build_args_never_reach_a_final_image(target):
    for stage in lineage(target):
        for keyword, args in stages()[stage][1]:
            assert "pip install" not in args, (stage, args)
            assert not (keyword == "ARG" and args.startswith("PIP_")), (stage, args)
    # The venvs are copied from builder stages instead.
    copies = [a for s in lineage(target) for k, a in stages()[s][1] if k == "COPY"]
    assert any(a.startswith("--from=") and "/opt/venv" in a for a in copies), target


def test_the_service_image_is_built_without_torch():
    chain = lineage("service")
    sources = {a.split()[0].removeprefix("--from=") for s in chain for k, a in stages()[s][1]
               if k == "COPY" and a.startswith("--from=")}  # fmt: skip
    assert "torch-deps" not in chain and sources == {"service-deps", "codegen"}
    assert ("RUN", "pip install -r service.txt -c constraints.txt") in stages()["service-deps"][1]
    generate = " ".join(a for k, a in stages()["requirements"][1] if k == "RUN")
    assert "requirements.py pyproject.toml core > service.txt" in generate


def test_torch_roles_share_one_torch_layer():
    for target in ("torchserve", "trainer"):
        assert stages()[target][0] == "torch-runtime", target
    assert stages()["torch-runtime"][1] == [("COPY", "--from=torch-deps /opt/venv /opt/venv")]


def test_pins_come_from_pyproject():
    # Every install reads a list the requirements stage wrote from pyproject.toml; no literal pin.
    generate = " ".join(a for k, a in stages()["requirements"][1] if k == "RUN")
    installs = [a for k, a in instructions() if k == "RUN" and "pip install" in a]
    assert len(installs) == 5
    for install in installs:
        (listed,) = re.findall(r"-r (\S+\.txt)", install)
        assert "requirements.py pyproject.toml " in generate and f"> {listed}" in generate
        assert listed == "torch.txt" or "-c constraints.txt" in install, install
    assert not re.search(r"\w==\d", " ".join(installs)), "a literal pin: read it from pyproject"


def test_the_torch_layer_depends_only_on_the_torch_pins():
    copies = [a for k, a in stages()["torch-deps"][1] if k == "COPY"]
    assert copies == ["--from=requirements /build/torch.txt ./"]
    generate = " ".join(a for k, a in stages()["requirements"][1] if k == "RUN")
    assert "--pins torch torchvision pillow > torch.txt" in generate


def test_generated_code_is_built_from_the_protos_not_copied_from_the_context():
    assert ("RUN", "python proto/generate.py") in stages()["codegen"][1]
    for target in ("service", "trainer"):
        assert ("COPY", "--from=codegen /build/refit/ refit/") in stages()[target][1], target


def test_the_classic_builder_builds_the_service_without_torch():
    # The classic builder builds every stage above the target: torch must come after service.
    order = list(stages())
    assert order.index("service") < order.index("torch-deps")
