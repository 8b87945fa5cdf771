"""The model registry as the service sees it, and the loop that keeps TorchServe in step with it.

The registry in the object store is the truth. The catalog caches it for the request path; the
reconciler registers every published version with TorchServe and restores each default, at
start-up, every ``REFIT_RECONCILE_INTERVAL_S`` and whenever a Predict finds TorchServe without a
version, so a restarted TorchServe comes back complete.

Each version is reconciled on its own: one that TorchServe refuses (a broken archive) is reported
(log, metrics, its registration in GetModel) and retried with exponential backoff, and the others
go on. A model whose default names no version record is reported as the model's problem. The
service is healthy when TorchServe serves the default of every model whose default has a record.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from refit.errors import NotFound, RefitError, Unavailable
from refit.identifiers import check_model_name
from refit.registry import ModelNotFound, Registry, VersionRecord
from refit.storage import ObjectStore
from refit.torchserve import ServedVersion, TorchServeClient
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
        self.errors: dict[str, str] = {}  # model -> why its records could not be read
        self._lock = threading.Lock()
        self._miss_lock = threading.Lock()
        self._last_refresh = 0.0

    def refresh(self) -> None:
        entries, errors = {}, {}
        for name in self.registry.models():
            try:
                versions = tuple(self.registry.versions(name))
                entries[name] = ModelEntry(name, self.registry.default_version(name), versions)
            except (RefitError, ValueError, TypeError, KeyError) as exc:
                # One model's unreadable record must not hide the others: keep its last view.
                errors[name] = f"its registry records cannot be read ({exc}); fix or delete them"
                log.warning("model %s: %s", name, errors[name])
                entries[name] = self._entries.get(name) or ModelEntry(name, None, ())
        with self._lock:
            self._entries = entries
            self.errors = errors
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


REGISTERED, PENDING, FAILED = "registered", "pending", "failed"


@dataclass(frozen=True)
class Registration:
    """Whether TorchServe holds one version, as the last reconcile pass saw it."""

    state: str = PENDING
    error: str = ""
    attempts: int = 0  # failed attempts in a row
    retry_at: float = 0.0  # monotonic time of the next attempt after a failure


@dataclass(frozen=True)
class RetryPolicy:
    first_s: float = 2.0
    max_s: float = 300.0

    def delay(self, attempts: int) -> float:
        return min(self.first_s * 2 ** max(attempts - 1, 0), self.max_s)


class Reconciler:
    def __init__(
        self,
        catalog: ModelCatalog,
        store: ObjectStore,
        bucket: str,
        torchserve: TorchServeClient,
        retry: RetryPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.catalog = catalog
        self.store = store
        self.bucket = bucket
        self.torchserve = torchserve
        self.retry = retry or RetryPolicy()
        self.clock = clock
        self.healthy = threading.Event()  # set after a pass in which every default was served
        self._registrations: dict[tuple[str, str], Registration] = {}
        self._problems: dict[str, str] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()

    # --- what GetModel shows ---------------------------------------------------------------------

    def registration(self, model: str, version: str) -> Registration:
        with self._lock:
            return self._registrations.get((model, version), Registration())

    def problem(self, model: str) -> str:
        with self._lock:
            return self._problems.get(model, "")

    def wake(self) -> None:
        """Asks for a pass soon: a Predict found TorchServe without a version, or unreachable."""
        self._wake.set()

    # --- one pass --------------------------------------------------------------------------------

    def run_once(self) -> int:
        """One pass; returns how many versions it registered. Raises only when TorchServe (or
        the registry) cannot be reached at all: then nothing can be decided."""
        self.catalog.refresh()
        served = {(v.model, v.version): v for v in self.torchserve.served_versions()}
        registrations: dict[tuple[str, str], Registration] = {}
        problems = dict(self.catalog.errors)
        registered, healthy = 0, True
        for entry in self.catalog.models():
            records = sorted(entry.versions, key=lambda r: r.version != entry.default_version)
            for record in records:  # the default first: it decides health
                key = (entry.name, record.version)
                registrations[key] = self._reconcile_version(record, served)
                registered += key not in served and registrations[key].state == REGISTERED
            problem = self._restore_default(entry, served, registrations)
            if problem:
                problems.setdefault(entry.name, problem)
            default = (entry.name, entry.default_version or "")
            if default in registrations and (problem or registrations[default].state != REGISTERED):
                healthy = False  # its default has a record but is not served
        with self._lock:
            self._registrations, self._problems = registrations, problems
        metrics.observe_registrations(
            {key: reg.state for key, reg in registrations.items()}, problems
        )
        if healthy:
            self.healthy.set()
        else:
            self.healthy.clear()
        return registered

    def _reconcile_version(
        self, record: VersionRecord, served: dict[tuple[str, str], ServedVersion]
    ) -> Registration:
        key = (record.model, record.version)
        if key in served:
            return Registration(REGISTERED)
        previous = self.registration(*key)
        if previous.state == FAILED and self.clock() < previous.retry_at:
            return previous  # backing off
        log.info("registering %s v%s with TorchServe", *key)
        try:
            url = self.store.url(self.bucket, record.archive_key)
            self.torchserve.register(record.model, url, batching=record.batching)
        except Unavailable:
            raise  # TorchServe itself is gone: end the pass
        except RefitError as exc:
            attempts = previous.attempts + 1
            delay = self.retry.delay(attempts)
            log.warning(
                "TorchServe refused %s v%s (attempt %d; retrying in %.0fs): %s",
                *key, attempts, delay, exc.message,
            )  # fmt: skip
            metrics.REGISTRATION_FAILURES.labels(record.model).inc()
            return Registration(FAILED, exc.message, attempts, self.clock() + delay)
        return Registration(REGISTERED)

    def _restore_default(
        self,
        entry: ModelEntry,
        served: dict[tuple[str, str], ServedVersion],
        registrations: dict[tuple[str, str], Registration],
    ) -> str:
        """Makes TorchServe's default the registry's; returns the model's problem, if any."""
        default = entry.default_version
        if default is None:
            return ""
        key = (entry.name, default)
        if key not in registrations:
            return (
                f"its default v{default} has no version record; "
                f"make an existing version the default (`refit promote {entry.name} VERSION`)"
            )
        if registrations[key].state != REGISTERED:
            return f"its default v{default} is not loaded in TorchServe"
        current = served.get(key)
        if current is not None and current.is_default:
            return ""
        try:
            self.torchserve.set_default(entry.name, default)
        except Unavailable:
            raise
        except RefitError as exc:
            log.warning("cannot make v%s the default of %s: %s", default, entry.name, exc.message)
            return f"TorchServe did not make v{default} its default: {exc.message}"
        return ""

    # --- the loop --------------------------------------------------------------------------------

    def run_forever(self, interval_s: float, stop: threading.Event) -> None:
        failures = 0
        while not stop.is_set():
            self._wake.clear()
            try:
                self.run_once()
                failures = 0
                wait = min(interval_s, self._next_retry_in())
            except Exception as exc:
                self.healthy.clear()
                failures += 1
                wait = min(interval_s, self.retry.delay(failures))
                message = getattr(exc, "message", None) or repr(exc)
                log.warning("reconcile pass failed (%s); next in %.0fs", message, wait)
            stop.wait(1.0)  # at most one pass a second, however often it is woken
            self._wake.wait(max(wait - 1.0, 0.0))

    def _next_retry_in(self) -> float:
        with self._lock:
            due = [r.retry_at for r in self._registrations.values() if r.state == FAILED]
        return max(min(due, default=float("inf")) - self.clock(), 0.0)
