"""Fixtures for the deployment checks."""

from __future__ import annotations

import pytest

from tests.deploy.helpers import ROOT, load_yaml
from tests.deploy.k8s_model import EXTRAS, LAYOUTS, render


@pytest.fixture(scope="session")
def compose() -> dict:
    """docker-compose.yml as parsed YAML (anchors and merge keys resolved)."""
    return load_yaml(ROOT / "docker-compose.yml")


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    """Every deploy/k8s layout and extra, rendered by `kubectl kustomize` and parsed."""
    return {layout: render(layout) for layout in [*LAYOUTS, *EXTRAS]}
