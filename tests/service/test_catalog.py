"""The catalog on the request path: a storm of Predicts for unknown versions or models costs at
most one registry read per MISS_REFRESH_INTERVAL_S, and a newly published version is still
found within that interval."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from refit.errors import NotFound
from refit.registry import Registry, VersionRecord
from refit.storage import FileStore
from service import catalog as catalog_module
from service.catalog import ModelCatalog
from tests.service.conftest import publish_records


class CountingStore(FileStore):
    """The embedded store, counting listings (a registry read lists the registry)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.listings = 0

    def list(self, bucket: str, prefix: str = ""):
        if prefix == "registry/":
            self.listings += 1
        return super().list(bucket, prefix)


@pytest.fixture
def store(tmp_path: Path) -> CountingStore:
    publish_records(tmp_path, {"imagenet": ["1"]})
    return CountingStore(tmp_path / "objects")


def test_unknown_versions_do_not_reread_the_registry_each_time(store: CountingStore) -> None:
    catalog = ModelCatalog(Registry(store, "refit"))
    catalog.refresh()
    store.listings = 0

    def ask() -> None:
        for _ in range(25):
            with pytest.raises(NotFound):
                catalog.resolve("imagenet", "999")
            with pytest.raises(NotFound):
                catalog.get("nosuchmodel")

    threads = [threading.Thread(target=ask) for _ in range(4)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - start
    allowed = 1 + int(elapsed / catalog_module.MISS_REFRESH_INTERVAL_S) + 1
    assert store.listings <= allowed, (store.listings, elapsed)


def test_a_version_published_since_is_found_after_the_interval(
    store: CountingStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(catalog_module, "MISS_REFRESH_INTERVAL_S", 0.2)
    catalog = ModelCatalog(Registry(store, "refit"))
    catalog.refresh()
    Registry(store, "refit").add(VersionRecord("imagenet", "2", "archives/x.mar", ["a", "b"]))
    time.sleep(0.25)
    assert catalog.resolve("imagenet", "2").version == "2"
