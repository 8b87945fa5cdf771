"""The model registry as the service sees it, and the loop that keeps TorchServe in step with it.

The registry in the object store is the truth. The catalog caches it for the request path; the
reconciler registers every published version with TorchServe and restores each default, at
start-up and every few seconds after, so a restarted TorchServe comes back complete.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from refit.errors import NotFound
from refit.identifiers import check_model_name
from refit.registry import ModelNotFound, Registry, VersionRecord
from refit.storage import ObjectStore
from refit.torchserve import TorchServeClient
from service import metrics

log = logging.getLogger(__name__)
MISS_REFRESH_INTERVAL_S = 1.0  # unknown names re-read the registry at most this often


@dataclass(frozen=True)
class ModelEntry:
    name: str
    default_version: str | None
    versions: tuple[VersionRecord, ...]

    def version(self, version: str) -> VersionRecord:
        for record in self.versions:
            if record.version == version:
                return record
        raise NotFound(f"model {self.name!r} has no version {version!r}")


class ModelCatalog:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._entries: dict[str, ModelEntry] = {}
        self._lock = threading.Lock()
        self._miss_lock = threading.Lock()
        self._last_refresh = 0.0

    def refresh(self) -> None:
        entries = {}
        for name in self.registry.models():
            versions = tuple(self.registry.versions(name))
            entries[name] = ModelEntry(name, self.registry.default_version(name), versions)
        with self._lock:
            self._entries = entries
            self._last_refresh = time.monotonic()
        metrics.observe_models(
            {e.name: len(e.versions) for e in entries.values()},
            {e.name: e.default_version for e in entries.values() if e.default_version},
        )

    def _refresh_after_miss(self) -> None:
        """Names not in the cache re-read the registry at most once per interval, whatever the
        request rate; callers that arrive during a read wait for it instead of starting more."""
        with self._miss_lock:
            if time.monotonic() - self._last_refresh > MISS_REFRESH_INTERVAL_S:
                self.refresh()

    def models(self) -> list[ModelEntry]:
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: e.name)

    def get(self, name: str) -> ModelEntry:
        check_model_name(name)
        entry = self._entries.get(name)
        if entry is None:
            self._refresh_after_miss()  # published since the last refresh?
            entry = self._entries.get(name)
        if entry is None:
            raise ModelNotFound(f"no model named {name!r}; `refit models` lists them")
        return entry

    def resolve(self, name: str, version: str = "") -> VersionRecord:
        entry = self.get(name)
        if version:
            try:
                return entry.version(version)
            except NotFound:
                self._refresh_after_miss()
                return self.get(name).version(version)
        if entry.default_version is None:
            raise NotFound(f"model {name!r} has no default version; name a version explicitly")
        return entry.version(entry.default_version)


class Reconciler:
    def __init__(
        self, catalog: ModelCatalog, store: ObjectStore, bucket: str, torchserve: TorchServeClient
    ) -> None:
        self.catalog = catalog
        self.store = store
        self.bucket = bucket
        self.torchserve = torchserve
        self.healthy = threading.Event()  # set after a pass that left TorchServe complete

    def run_once(self) -> int:
        """One pass; returns how many versions it had to register."""
        self.catalog.refresh()
        served = {(v.model, v.version): v for v in self.torchserve.served_versions()}
        registered = 0
        for entry in self.catalog.models():
            for record in entry.versions:
                if (entry.name, record.version) not in served:
                    log.info("registering %s v%s with TorchServe", entry.name, record.version)
                    url = self.store.url(self.bucket, record.archive_key)
                    self.torchserve.register(entry.name, url)
                    registered += 1
            current = served.get((entry.name, entry.default_version or ""))
            if entry.default_version and (registered or not (current and current.is_default)):
                self.torchserve.set_default(entry.name, entry.default_version)
        self.healthy.set()
        return registered

    def run_forever(self, interval_s: float, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.run_once()
            except Exception:
                self.healthy.clear()
                log.exception("reconcile failed; retrying in %.0fs", interval_s)
            stop.wait(interval_s if self.healthy.is_set() else min(interval_s, 2.0))
