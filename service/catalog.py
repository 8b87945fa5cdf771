"""The model registry as the request path sees it: a cache of the object store's registry
(refit/registry.py), re-read by each reconcile pass (service/reconciler.py), by the watch when
the registry's listing changes (service/watch.py), and after a miss.

Names the cache knows never wait on the store. A name it does not know (published since the
last read?) re-reads the registry, at most once per ``MISS_REFRESH_INTERVAL_S`` and one re-read
at a time, in the background: each caller waits for it at most ``MISS_WAIT_S``, or its own
deadline if that is shorter. When the re-read failed or did not finish in time the caller gets
UNAVAILABLE "the model registry could not be read", never NOT_FOUND: the model may exist.

Every read's outcome is kept. While the registry cannot be read the cache serves its last view,
``refit_object_store_up`` is 0 and ``stale()`` says since when and why (GetModel shows it); until
a first read succeeds nothing is cached, and the service cannot answer (service/rotation.py).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass

from refit.errors import NotFound, RefitError, Unavailable
from refit.identifiers import check_model_name
from refit.registry import ModelNotFound, Registry, VersionRecord
from refit.storage import StoreUnreachable
from service import metrics

log = logging.getLogger(__name__)
MISS_REFRESH_INTERVAL_S = 1.0  # unknown names re-read the registry at most this often
MISS_WAIT_S = 2.0  # ... and wait for that read at most this long

Listing = tuple[tuple[str, str], ...]


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

    def default_problem(self) -> str | None:
        """None when the model has a default with a record (TorchServe must serve it); else ""
        (no default: nothing to serve) or the model's problem."""
        default = self.default_version
        if default is None:
            return ""
        if not any(record.version == default for record in self.versions):
            return (
                f"its default v{default} has no version record; "
                f"make an existing version the default (`refit promote {self.name} VERSION`)"
            )
        return None


class ModelCatalog:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._entries: dict[str, ModelEntry] = {}
        self.errors: dict[str, str] = {}  # model -> why its records could not be read
        self.loaded = False  # a read succeeded once: there is a view to serve
        self._lock = threading.Lock()
        self._listing: Listing | None = None
        self._read_at = float("-inf")  # monotonic end of the last read, answered or not
        self._failure = ""  # why the last read failed; "" when it answered
        self._failing_since = 0.0  # wall-clock time of the first failure in a row
        self._reread: threading.Event | None = None  # set when the miss re-read in flight ends

    # --- reading the registry --------------------------------------------------------------------

    def refresh(self) -> None:
        """Reads the whole registry; when it cannot, keeps the last view and raises."""
        error = self._read()
        if error is not None:
            raise error

    def try_refresh(self) -> str:
        """Reads the whole registry; "" when it could, else why not (the last view is kept)."""
        error = self._read()
        return "" if error is None else _reason(error)

    def changed(self) -> bool:
        """Whether the registry changed since the last read: one listing of its keys and etags,
        cheap enough to ask every second (a promotion made through another service)."""
        try:
            listing = self.registry.listing()
        except Exception as exc:  # whatever the store raised, the registry could not be read
            self._failed(exc)
            raise
        if listing != self._listing:
            return True
        self._answered()  # nothing changed: the cached view is current
        return False

    def _read(self) -> Exception | None:
        try:
            listing = self.registry.listing()
            entries, errors = self._read_models(listing)
        except Exception as exc:  # whatever the store raised, the registry could not be read
            self._failed(exc)
            return exc
        with self._lock:
            self._entries, self.errors, self._listing = entries, errors, listing
            self.loaded = True
        self._answered()
        metrics.observe_models(
            {e.name: len(e.versions) for e in entries.values()},
            {e.name: e.default_version for e in entries.values() if e.default_version},
        )
        return None

    def _read_models(self, listing: Listing) -> tuple[dict[str, ModelEntry], dict[str, str]]:
        entries, errors = {}, {}
        for name in self.registry.models(listing):
            try:
                versions = tuple(self.registry.versions(name))
                entries[name] = ModelEntry(name, self.registry.default_version(name), versions)
            except StoreUnreachable:
                raise  # the store's failure, not the model's: the whole read failed
            except (RefitError, ValueError, TypeError, KeyError) as exc:
                # One model's unreadable record must not hide the others: keep its last view.
                errors[name] = f"its registry records cannot be read ({exc}); fix or delete them"
                log.warning("model %s: %s", name, errors[name])
                entries[name] = self._entries.get(name) or ModelEntry(name, None, ())
        return entries, errors

    def _answered(self) -> None:
        with self._lock:
            was_failing, self._failure = self._failure, ""
            self._read_at = time.monotonic()
        if was_failing:
            log.info("the model registry answers again")
        metrics.OBJECT_STORE_UP.set(1)

    def _failed(self, exc: Exception) -> None:
        reason = _reason(exc)
        with self._lock:
            first = not self._failure
            if first:
                self._failing_since = time.time()
            self._failure = reason
            self._read_at = time.monotonic()
        if first:
            log.warning("the model registry could not be read (%s): serving the last view", reason)
        metrics.OBJECT_STORE_UP.set(0)

    def stale(self) -> str:
        """Since when and why the registry cannot be read; "" while it answers."""
        with self._lock:
            if not self._failure:
                return ""
            since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self._failing_since))
            return (
                f"the object store has not answered registry reads since {since} "
                f"({self._failure}): this is the registry as last read; new versions, promotions "
                "and retraining wait until it answers"
            )

    # --- the request path ------------------------------------------------------------------------

    def models(self) -> list[ModelEntry]:
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: e.name)

    def get(self, name: str, wait_s: float | None = None) -> ModelEntry:
        """``wait_s``: the caller's time left (its deadline), if it has one."""
        check_model_name(name)
        entry = self._entries.get(name)
        if entry is None:
            self._refresh_after_miss(wait_s)  # published since the last read?
            entry = self._entries.get(name)
        if entry is None:
            raise ModelNotFound(f"no model named {name!r}; `refit models` lists them")
        return entry

    def resolve(self, name: str, version: str = "", wait_s: float | None = None) -> VersionRecord:
        entry = self.get(name, wait_s)
        if version:
            try:
                return entry.version(version)
            except NotFound:
                self._refresh_after_miss(wait_s)
                return self.get(name, wait_s).version(version)
        if entry.default_version is None:
            raise NotFound(f"model {name!r} has no default version; name a version explicitly")
        return entry.version(entry.default_version)

    def _refresh_after_miss(self, wait_s: float | None) -> None:
        """Returns once the registry was read recently enough to trust a miss; raises
        Unavailable when it could not be read, or not within the wait (module doc)."""
        reread = self._start_reread()
        wait = MISS_WAIT_S if wait_s is None else max(min(wait_s, MISS_WAIT_S), 0.0)
        if reread is not None and not reread.wait(wait):
            raise Unavailable(
                f"the model registry could not be read (the object store did not answer within "
                f"{wait:.1f}s); retry"
            )
        with self._lock:
            failure = self._failure
        if failure:
            raise Unavailable(f"the model registry could not be read ({failure}); retry")

    def _start_reread(self) -> threading.Event | None:
        """The re-read in flight; else a new one if the last read is older than the interval;
        None: the last read is recent enough to answer from."""
        with self._lock:
            stale = time.monotonic() - self._read_at > MISS_REFRESH_INTERVAL_S
            if self._reread is None and stale:
                self._reread = threading.Event()
                threading.Thread(
                    target=self._reread_now, args=(self._reread,), daemon=True, name="reread"
                ).start()
            return self._reread

    def _reread_now(self, done: threading.Event) -> None:
        try:
            self._read()  # its outcome is kept: the waiting callers answer from it
        finally:
            with self._lock:
                self._reread = None
            done.set()


def _reason(exc: Exception) -> str:
    """The error's message without its closing advice to retry (the caller gives its own)."""
    message = getattr(exc, "message", None) or repr(exc)
    return re.sub(r";\s*retry\b[^;]*$", "", message)
