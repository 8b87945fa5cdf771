"""The project image's Dockerfile: hadolint-clean, non-root, same pins as pyproject.toml."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from tests.deploy.helpers import ROOT, assert_ok, run_tool

DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, args = line.partition(" ")
            pairs.append((keyword.upper(), args.strip()))
    return pairs


def test_hadolint_finds_nothing():
    assert_ok(run_tool("hadolint", DOCKERFILE))


def test_hadolint_reports_findings(tmp_path: Path):
    # The check above is only worth something if hadolint fails on findings.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install requests\n")
    assert run_tool("hadolint", bad).returncode != 0


def test_runs_as_a_non_root_user():
    users = [args for keyword, args in instructions() if keyword == "USER"]
    assert users, "no USER instruction: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert user.isdigit(), "numeric, so runtimes can verify it is not root"


def test_installs_the_pins_of_pyproject_and_builds_the_generated_code():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    runs = [args for keyword, args in instructions() if keyword == "RUN"]
    first_pip = next(r for r in runs if "pip install" in r)
    for pin in ("torch==", "torchvision=="):
        assert next(d for d in dependencies if d.startswith(pin)) in first_pip.split()
    # The rest comes from pyproject.toml itself, then the package without re-resolving.
    assert any("pyproject.toml" in r and "pip install" in r for r in runs)
    build = next(r for r in runs if "proto/generate.py" in r)
    install = "pip install --no-cache-dir --no-deps ."
    assert build.index("python proto/generate.py") < build.index(install)
