from __future__ import annotations

import json
from dataclasses import replace

import pytest

from refit.identifiers import InvalidModelName
from refit.registry import (
    MAX_BATCH_DELAY_MS,
    MAX_BATCH_SIZE,
    Batching,
    ModelNotFound,
    Registry,
    VersionRecord,
)
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


def test_batching_is_recorded_and_older_records_get_the_defaults(
    registry: Registry, file_store: FileStore
) -> None:
    registry.add(replace(record("1"), batching=Batching(batch_size=4, max_batch_delay_ms=20)))
    assert registry.get("birds", "1").batching == Batching(4, 20)
    older = json.loads(record("2").to_json())
    del older["batching"]  # written before batching existed
    file_store.put("refit", "registry/birds/versions/2.json", json.dumps(older).encode())
    assert registry.get("birds", "2").batching == Batching()


def test_precision_and_accuracies_round_trip_and_older_records_are_fp32(
    registry: Registry, file_store: FileStore
) -> None:
    int8 = replace(record("1"), precision="int8", fp32_accuracy=0.91, int8_accuracy=0.909)
    registry.add(int8)
    assert registry.get("birds", "1") == int8
    older = json.loads(record("2").to_json())
    for name in ("precision", "fp32_accuracy", "int8_accuracy"):
        del older[name]  # written before precisions were chosen: TorchScript, fp32
    file_store.put("refit", "registry/birds/versions/2.json", json.dumps(older).encode())
    loaded = registry.get("birds", "2")
    assert (loaded.precision, loaded.fp32_accuracy, loaded.int8_accuracy) == ("fp32", None, None)


@pytest.mark.parametrize(
    ("size", "delay_ms"), [(0, 5), (MAX_BATCH_SIZE + 1, 5), (8, 0), (8, MAX_BATCH_DELAY_MS + 1)]
)
def test_batching_out_of_range_is_refused(size: int, delay_ms: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        Batching(size, delay_ms)
