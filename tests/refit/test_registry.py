from __future__ import annotations

import pytest

from refit.identifiers import InvalidModelName
from refit.registry import ModelNotFound, Registry, VersionRecord
from refit.storage import FileStore


@pytest.fixture
def registry(file_store: FileStore) -> Registry:
    file_store.ensure_bucket("refit")
    return Registry(file_store, "refit")


def record(version: str, model: str = "birds") -> VersionRecord:
    return VersionRecord(model, version, f"archives/{model}/{version}.mar", ["a", "b"])


def test_versions_default_and_next(registry: Registry) -> None:
    assert registry.models() == [] and registry.next_version("birds") == "1"
    added = {v: record(v) for v in ("1", "2", "10")}
    for r in added.values():
        registry.add(r)
    assert [r.version for r in registry.versions("birds")] == ["1", "2", "10"]  # numeric order
    assert registry.next_version("birds") == "11"
    assert registry.default_version("birds") is None
    registry.set_default("birds", "2")
    assert registry.default_version("birds") == "2"
    assert registry.get("birds", "10") == added["10"]
    assert registry.models() == ["birds"]


def test_missing_versions_and_bad_names(registry: Registry) -> None:
    with pytest.raises(ModelNotFound, match="no version '3'"):
        registry.get("birds", "3")
    with pytest.raises(ModelNotFound):
        registry.set_default("birds", "3")
    for bad in ("", "Birds", "a/b", "../x", "x" * 64):
        with pytest.raises(InvalidModelName):
            registry.versions(bad)


def test_archive_keys_are_content_addressed() -> None:
    assert Registry.archive_key("birds", "ab12") == "archives/birds/ab12.mar"
