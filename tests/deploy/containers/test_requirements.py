"""deploy/containers/requirements.py: each image installs exactly its role's pins from
pyproject.toml; the service's role holds no torch."""

from __future__ import annotations

import subprocess
import sys
import tomllib

from deploy.containers import requirements
from tests.deploy.helpers import ROOT

PYPROJECT = ROOT / "pyproject.toml"
TABLE = requirements.groups(PYPROJECT)


def names(pins: list[str]) -> set[str]:
    return {requirements.EXTRAS.sub("", p).partition("==")[0] for p in pins}


def test_every_requirement_is_pinned():
    for group, pins in TABLE.items():
        for pin in pins:
            assert "==" in pin or requirements.SELF_REFERENCE.match(pin), (group, pin)


def test_the_service_role_holds_no_torch():
    core = names(requirements.requirements(TABLE, ["core"]))
    assert {"grpcio", "protobuf", "minio", "prometheus-client"} <= core
    assert not core & {"torch", "torchvision", "torchserve", "torch-model-archiver"}


def test_torch_roles_get_the_torch_pins():
    for role in ("torchserve", "trainer"):
        pins = requirements.requirements(TABLE, [role])
        assert {"torch==2.14.1", "torchvision==0.29.1"} <= set(pins), role


def test_dev_expands_to_every_role_make_install_needs():
    dev = names(requirements.requirements(TABLE, ["core", "dev"]))
    every_role = names(requirements.requirements(TABLE, ["core", "torchserve", "trainer"]))
    assert every_role | {"grpcio-tools"} <= dev


def test_the_constraints_hold_one_pin_per_package_without_extras():
    pins = requirements.requirements(TABLE, list(TABLE))
    constraints = subprocess.run(
        [sys.executable, requirements.__file__, str(PYPROJECT), "--all"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert "moto==5.2.5" in constraints and "[" not in "".join(constraints)
    assert len(constraints) == len(names(pins))


def test_pins_lists_only_the_named_packages():
    out = subprocess.run(
        [sys.executable, requirements.__file__, str(PYPROJECT), "--pins", "torch", "torchvision"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert out == ["torch==2.14.1", "torchvision==0.29.1"]


def test_unknown_group_is_refused():
    result = subprocess.run(
        [sys.executable, requirements.__file__, str(PYPROJECT), "gpu"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode != 0 and "unknown group 'gpu'" in result.stderr


def test_reads_the_project_table():
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    assert TABLE["core"] == project["dependencies"]
