"""Fixtures for the deployment checks."""

from __future__ import annotations

import pytest

from tests.deploy.helpers import ROOT, load_yaml


@pytest.fixture(scope="session")
def compose() -> dict:
    """docker-compose.yml as parsed YAML (anchors and merge keys resolved)."""
    return load_yaml(ROOT / "docker-compose.yml")
