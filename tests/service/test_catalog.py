"""The catalog on the request path: a storm of Predicts for unknown versions or models costs at
most one registry read per MISS_REFRESH_INTERVAL_S, and a newly published version is still
found within that interval. While the store hangs, at most one re-read is in flight and each
caller waits at most MISS_WAIT_S (or its own deadline), then gets UNAVAILABLE (issue 23; before,
the callers queued on a lock, each re-reading in turn). tests/service/test_registry_miss.py runs
the same with real servers."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from refit.errors import NotFound, RefitError, Unavailable
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


class HangingStore(FileStore):
    """The embedded store, whose registry listing hangs while ``answering`` is clear (a store
    that accepts connections and never answers); counts the listings in flight."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.answering = threading.Event()
        self.answering.set()
        self.in_flight = self.most_in_flight = 0
        self._lock = threading.Lock()

    def list(self, bucket: str, prefix: str = ""):
        if prefix == "registry/":
            with self._lock:
                self.in_flight += 1
                self.most_in_flight = max(self.most_in_flight, self.in_flight)
            self.answering.wait()
            with self._lock:
                self.in_flight -= 1
        return super().list(bucket, prefix)


def test_unknown_names_wait_a_bounded_time_while_the_store_hangs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(catalog_module, "MISS_WAIT_S", 1.0)
    monkeypatch.setattr(catalog_module, "MISS_REFRESH_INTERVAL_S", 0.0)  # every miss may re-read
    publish_records(tmp_path, {"imagenet": ["1"]})
    store = HangingStore(tmp_path / "objects")
    catalog = ModelCatalog(Registry(store, "refit"))
    catalog.refresh()
    answers: dict[str, tuple[Exception, float]] = {}

    def ask(name: str, wait_s: float | None = None) -> None:
        start = time.monotonic()
        try:
            catalog.get(name, wait_s=wait_s)
        except RefitError as exc:
            answers[name] = (exc, time.monotonic() - start)

    store.answering.clear()
    threads = [threading.Thread(target=ask, args=(f"unknown-{i}",)) for i in range(20)]
    threads.append(threading.Thread(target=ask, args=("short-deadline", 0.1)))
    try:
        for thread in threads:
            thread.start()
        start = time.monotonic()
        assert catalog.get("imagenet").name == "imagenet"  # known: never waits on the store
        assert time.monotonic() - start < 0.1
        for thread in threads:
            thread.join(timeout=3.0)
        assert not any(t.is_alive() for t in threads), "callers still waiting on the store"
    finally:
        store.answering.set()
        for thread in threads:
            thread.join()
    assert store.most_in_flight == 1
    assert len(answers) == 21
    for exc, seconds in answers.values():
        assert isinstance(exc, Unavailable), exc
        assert exc.message.startswith("the model registry could not be read"), exc.message
        assert seconds <= 1.0 + 0.5, seconds  # the wait, plus scheduling on a busy machine
    assert answers["short-deadline"][1] < 0.6  # 0.1 s left: it waited that, not MISS_WAIT_S
    # The store answers again: the next miss reads it, and an unknown name is unknown.
    with pytest.raises(NotFound):
        catalog.get("unknown-0")
