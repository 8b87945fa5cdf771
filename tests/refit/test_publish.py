"""Pure parts of publishing. Publishing itself runs against a real TorchServe in
tests/service/test_retrain.py."""

from __future__ import annotations

import pytest

from refit.identifiers import InvalidModelName
from refit.publish import version_key


def test_version_key_follows_the_registry_layout() -> None:
    assert version_key("flowers", "3") == "registry/flowers/versions/3.json"
    with pytest.raises(InvalidModelName):
        version_key("../etc", "1")
