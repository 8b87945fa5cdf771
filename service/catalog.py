"""The model registry as the service sees it, and the loops that keep TorchServe in step with it.

The registry in the object store is the truth. The catalog caches it for the request path; the
reconciler registers every published version with every TorchServe replica and restores each
default there, at start-up, every ``REFIT_RECONCILE_INTERVAL_S`` and whenever something changed.
A watch every ``REFIT_WATCH_INTERVAL_S`` notices the changes between passes: the registry's
listing (a promotion made through another service replica), and a replica that stopped
answering, lost its models (restarted), came back or joined (DNS). A replica found so leaves the
Predict rotation at once; a pass registers everything on it and puts it back.

Versions are registered without a TorchServe worker, except each model's default (one worker,
within the ``Workers`` budget): workers for the rest start on demand (service/workers.py), and
a pass tells ``Workers`` what each replica runs. TorchServe's default is set only when this
reconciler has not set it on that replica yet (TorchServe 0.12's describe does not say which
version is the default), so a pass where nothing changed makes no management call but the
listing and the describes.

Each version is reconciled on its own, on each replica: one that TorchServe refuses (a broken
archive) is reported (log, metrics, its registration in GetModel) and retried with exponential
backoff, and the others go on. A model whose default names no version record is reported as the
model's problem. Predicts go to the replicas that serve every default whose version has a record
(all reachable ones when none does), and the service is healthy while at least one does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime

from refit.errors import NotFound, RefitError, Unavailable
from refit.identifiers import check_model_name
from refit.registry import ModelNotFound, Registry, VersionRecord
from refit.storage import ObjectStore
from refit.torchserve import ReplicaClient, ServedVersion, TorchServeClient
from service import metrics
from service.workers import Observation, Workers

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
        self._listing: tuple[tuple[str, str], ...] | None = None

    def refresh(self) -> None:
        entries, errors = {}, {}
        listing = self.registry.listing()
        for name in self.registry.models(listing):
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
            self._listing = listing
        metrics.observe_models(
            {e.name: len(e.versions) for e in entries.values()},
            {e.name: e.default_version for e in entries.values() if e.default_version},
        )

    def changed(self) -> bool:
        """Whether the registry changed since the last refresh: one listing of its keys and
        etags, cheap enough to ask every second (a promotion made through another service)."""
        return self.registry.listing() != self._listing

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
_SEVERITY = {REGISTERED: 0, PENDING: 1, FAILED: 2}


@dataclass(frozen=True)
class Registration:
    """Whether one TorchServe replica holds one version, as the last reconcile pass saw it."""

    state: str = PENDING
    error: str = ""
    attempts: int = 0  # failed attempts in a row
    retry_at: float = 0.0  # monotonic time of the next attempt after a failure
    replica: str = ""


@dataclass(frozen=True)
class RetryPolicy:
    first_s: float = 2.0
    max_s: float = 300.0

    def delay(self, attempts: int) -> float:
        return min(self.first_s * 2 ** max(attempts - 1, 0), self.max_s)


# (model, version) -> replica name -> its registration there
Registrations = dict[tuple[str, str], dict[str, Registration]]
WorkerCounts = dict[tuple[str, str], int]  # one replica: (model, version) -> its workers there


class Reconciler:
    def __init__(
        self,
        catalog: ModelCatalog,
        store: ObjectStore,
        bucket: str,
        torchserve: TorchServeClient,
        retry: RetryPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        workers: Workers | None = None,
    ) -> None:
        self.catalog = catalog
        self.store = store
        self.bucket = bucket
        self.torchserve = torchserve
        self.retry = retry or RetryPolicy()
        self.clock = clock
        self.workers = workers
        # replica -> model -> the default this reconciler set there (forgotten when the replica
        # is unreachable or lost the version: it may have restarted)
        self._defaults_set: dict[str, dict[str, str]] = {}
        self.healthy = threading.Event()  # set after a pass in which a replica served every default
        self._registrations: Registrations = {}
        self._problems: dict[str, str] = {}
        self._reachable: dict[str, bool] = {}  # replica -> it answered in the last pass
        self._rotation: set[str] = set()  # replicas that get Predicts
        self._served_models: set[str] = set()  # models each replica in rotation must list
        self._lock = threading.Lock()
        self._wake = threading.Event()

    # --- what GetModel shows ---------------------------------------------------------------------

    def registration(self, model: str, version: str) -> Registration:
        """The worst state over the replicas (failed, then pending), naming that replica when
        there are several; ``registrations`` has each replica's own."""
        states = self.registrations(model, version)
        if not states:
            return Registration()
        worst = max(states, key=lambda r: _SEVERITY[r.state])
        if len(states) > 1 and worst.state != REGISTERED:
            return replace(worst, error=f"replica {worst.replica}: {worst.error or 'not loaded'}")
        return worst

    def registrations(self, model: str, version: str) -> list[Registration]:
        with self._lock:
            return list(self._registrations.get((model, version), {}).values())

    def problem(self, model: str) -> str:
        with self._lock:
            return self._problems.get(model, "")

    def wake(self) -> None:
        """Asks for a pass soon: a Predict found TorchServe without a version, or unreachable."""
        self._wake.set()

    # --- one pass --------------------------------------------------------------------------------

    def run_once(self) -> int:
        """One pass over every replica; returns how many registrations it made. Raises only
        when no replica (or the registry) can be reached: then nothing can be decided."""
        self.catalog.refresh()
        entries = self.catalog.models()
        registrations: Registrations = {}
        troubles: dict[
            str, dict[str, str]
        ] = {}  # replica -> model -> why its default is not served
        reachable: dict[str, bool] = {}
        in_line: list[ReplicaClient] = []
        counts: list[WorkerCounts] = []
        registered = 0
        for replica in self.torchserve.replicas():
            try:
                made, troubles[replica.name], replica_counts = self._reconcile_replica(
                    replica, entries, registrations
                )
            except Unavailable as exc:
                reachable[replica.name] = False
                self._mark_unreachable(replica, entries, registrations, exc.message)
                continue
            reachable[replica.name] = True
            counts.append(replica_counts)
            registered += made
            if not troubles[replica.name]:
                in_line.append(replica)
        if not any(reachable.values()):
            with self._lock:
                self._reachable = reachable
            metrics.observe_replicas(reachable, set())
            raise Unavailable("no TorchServe replica answered; retrying")
        problems, served_defaults = self._model_problems(entries, registrations, troubles)
        rotation = in_line or [r for r in self.torchserve.replicas() if reachable.get(r.name)]
        self.torchserve.set_rotation(rotation)
        with self._lock:
            self._registrations, self._problems = registrations, problems
            self._reachable = reachable
            self._rotation = {r.name for r in in_line}
            self._served_models = served_defaults
        metrics.observe_registrations(
            {
                (model, version, replica): reg.state
                for (model, version), states in registrations.items()
                for replica, reg in states.items()
            },
            problems,
        )
        metrics.observe_replicas(reachable, {r.name for r in in_line})
        if self.workers is not None:
            self.workers.observe(_observation(entries, counts))
            self.workers.warm_defaults()
        if in_line:
            self.healthy.set()
        else:
            self.healthy.clear()
        return registered

    def _model_problems(
        self,
        entries: list[ModelEntry],
        registrations: Registrations,
        troubles: dict[str, dict[str, str]],
    ) -> tuple[dict[str, str], set[str]]:
        """Each model's problem (its records, or no replica serves its default), and the models
        whose default some replica serves."""
        problems = dict(self.catalog.errors)
        served = set()
        for entry in entries:
            problem = _default_problem(entry)
            if problem is None:
                states = registrations.get((entry.name, entry.default_version or ""), {})
                if any(
                    reg.state == REGISTERED and entry.name not in troubles.get(name, {})
                    for name, reg in states.items()
                ):
                    served.add(entry.name)
                    continue
                reasons = [t[entry.name] for t in troubles.values() if entry.name in t]
                problem = reasons[0] if reasons else "its default is not loaded in TorchServe"
            if problem:
                problems.setdefault(entry.name, problem)
        return problems, served

    def _reconcile_replica(
        self, replica: ReplicaClient, entries: list[ModelEntry], registrations: Registrations
    ) -> tuple[int, dict[str, str], WorkerCounts]:
        """Every version and default on one replica. Returns the registrations it made, per
        model why the replica does not serve its default (none: the replica is in line), and
        the workers each version has there now."""
        served = {(v.model, v.version): v for v in replica.served_versions()}
        mine = {(e.name, r.version) for e in entries for r in e.versions}
        counts = {key: version.workers for key, version in served.items() if key in mine}
        made, troubles = 0, {}
        for entry in entries:
            records = sorted(entry.versions, key=lambda r: r.version != entry.default_version)
            for record in records:  # the default first: it decides whether the replica is in line
                key = (entry.name, record.version)
                workers = self._workers_at_registration(entry, record, counts)
                state = self._reconcile_version(replica, record, served, workers)
                registrations.setdefault(key, {})[replica.name] = state
                if key not in served and state.state == REGISTERED:
                    made += 1
                    counts[key] = workers
            if _default_problem(entry) is not None:
                continue  # no default, or one without a record: the model's problem
            trouble = self._restore_default(replica, entry, served, registrations)
            if trouble:
                troubles[entry.name] = trouble
        return made, troubles, counts

    def _workers_at_registration(
        self, entry: ModelEntry, record: VersionRecord, counts: WorkerCounts
    ) -> int:
        """A default gets a worker (within the budget); every other version starts on demand."""
        if record.version != entry.default_version:
            return 0
        if self.workers is None:
            return 1
        return self.workers.default_workers(sum(1 for n in counts.values() if n))

    def _mark_unreachable(
        self,
        replica: ReplicaClient,
        entries: list[ModelEntry],
        registrations: Registrations,
        reason: str,
    ) -> None:
        log.warning("TorchServe replica %s is unreachable: %s", replica.name, reason)
        self._defaults_set.pop(replica.name, None)  # it may come back restarted
        for entry in entries:
            for record in entry.versions:
                previous = self._previous(record.model, record.version, replica.name)
                registrations.setdefault((entry.name, record.version), {})[replica.name] = (
                    Registration(PENDING, f"unreachable: {reason}", previous.attempts,
                                 previous.retry_at, replica.name)
                )  # fmt: skip

    def _previous(self, model: str, version: str, replica: str) -> Registration:
        with self._lock:
            return self._registrations.get((model, version), {}).get(replica, Registration())

    def _reconcile_version(
        self,
        replica: ReplicaClient,
        record: VersionRecord,
        served: dict[tuple[str, str], ServedVersion],
        workers: int = 0,
    ) -> Registration:
        key = (record.model, record.version)
        if key in served:
            return Registration(REGISTERED, replica=replica.name)
        previous = self._previous(*key, replica.name)
        if previous.state == FAILED and self.clock() < previous.retry_at:
            return previous  # backing off
        log.info("registering %s v%s with TorchServe replica %s", *key, replica.name)
        try:
            replica.ensure(
                record.model,
                record.version,
                self.store.url(self.bucket, record.archive_key),
                batching=record.batching,
                workers=workers,
            )
        except Unavailable:
            raise  # the replica itself is gone: the rest of its pass is moot
        except RefitError as exc:
            attempts = previous.attempts + 1
            delay = self.retry.delay(attempts)
            log.warning(
                "TorchServe replica %s refused %s v%s (attempt %d; retrying in %.0fs): %s",
                replica.name, *key, attempts, delay, exc.message,
            )  # fmt: skip
            metrics.REGISTRATION_FAILURES.labels(record.model).inc()
            return Registration(FAILED, exc.message, attempts, self.clock() + delay, replica.name)
        return Registration(REGISTERED, replica=replica.name)

    def _restore_default(
        self,
        replica: ReplicaClient,
        entry: ModelEntry,
        served: dict[tuple[str, str], ServedVersion],
        registrations: Registrations,
    ) -> str:
        """Makes the replica's default the registry's; returns the trouble, if any. Calls
        TorchServe only when this reconciler has not set that default there yet, or the
        replica had lost the version (restarted)."""
        default = entry.default_version or ""
        key = (entry.name, default)
        if registrations[key][replica.name].state != REGISTERED:
            return f"its default v{default} is not loaded in TorchServe"
        defaults_set = self._defaults_set.setdefault(replica.name, {})
        if key in served and defaults_set.get(entry.name) == default:
            return ""
        defaults_set.pop(entry.name, None)
        try:
            replica.set_default(entry.name, default)
        except Unavailable:
            raise
        except RefitError as exc:
            log.warning(
                "cannot make v%s the default of %s on %s: %s",
                default, entry.name, replica.name, exc.message,
            )  # fmt: skip
            return f"TorchServe did not make v{default} its default: {exc.message}"
        defaults_set[entry.name] = default
        return ""

    # --- the loops -------------------------------------------------------------------------------

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

    def watch_forever(self, interval_s: float, stop: threading.Event) -> None:
        """Between passes: wakes a pass when the registry or a replica changed (module doc)."""
        while not stop.wait(interval_s):
            try:
                registry_changed = self.catalog.changed()
                if registry_changed:
                    self.catalog.refresh()  # Predicts see a new default before the pass runs
            except Exception as exc:
                registry_changed = False
                log.debug("registry watch failed: %s", getattr(exc, "message", None) or exc)
            if registry_changed | self._replicas_changed():
                self.wake()

    def _replicas_changed(self) -> bool:
        """A replica joined, left, died, lost its models or answers again. One in rotation that
        fails the check leaves the rotation now, before the pass that brings it back in line."""
        replicas = self.torchserve.replicas()
        with self._lock:
            reachable, rotation = dict(self._reachable), set(self._rotation)
            expected = set(self._served_models)
        changed = {r.name for r in replicas} != set(reachable)
        failing = []
        for replica in replicas:
            try:
                up, names = True, replica.model_names()
            except RefitError:
                up, names = False, set()
            if replica.name in rotation and not (up and expected <= names):
                failing.append(replica.name)
            elif up and not reachable.get(replica.name, False):
                changed = True
        if failing:
            log.warning("TorchServe replicas %s leave the rotation", ", ".join(failing))
            with self._lock:
                self._rotation -= set(failing)
                rotation = set(self._rotation)
            self.torchserve.set_rotation([r for r in replicas if r.name in rotation])
            metrics.observe_replicas({**reachable, **dict.fromkeys(failing, False)}, rotation)
        return changed or bool(failing)

    def _next_retry_in(self) -> float:
        with self._lock:
            due = [
                r.retry_at
                for states in self._registrations.values()
                for r in states.values()
                if r.state == FAILED
            ]
            unreachable = not all(self._reachable.values())
        if unreachable:  # a replica is down: look again soon (the watch also wakes us)
            due.append(self.clock() + self.retry.first_s)
        return max(min(due, default=float("inf")) - self.clock(), 0.0)


def _observation(entries: list[ModelEntry], counts: list[WorkerCounts]) -> Observation:
    """What ``Workers`` needs from a pass (``counts`` has the registry's versions only: a
    TorchServe may hold others): versions held, with a worker somewhere, with one on every
    reachable replica; the defaults; when each version was published."""
    created = {
        (record.model, record.version): _epoch(record.created_at)
        for entry in entries
        for record in entry.versions
    }
    registered = {key for replica in counts for key in replica}
    holding = {key for replica in counts for key, n in replica.items() if n}
    ready = {key for key in holding if all(replica.get(key, 0) for replica in counts)}
    defaults = {(e.name, e.default_version) for e in entries if e.default_version}
    return Observation(registered, holding, ready, defaults, created)


def _epoch(timestamp: str) -> float:
    try:
        return datetime.fromisoformat(timestamp).timestamp()
    except ValueError:
        return 0.0


def _default_problem(entry: ModelEntry) -> str | None:
    """None when the model has a default with a record (the replicas must serve it); else ""
    (no default: nothing to serve) or the model's problem."""
    default = entry.default_version
    if default is None:
        return ""
    if not any(record.version == default for record in entry.versions):
        return (
            f"its default v{default} has no version record; "
            f"make an existing version the default (`refit promote {entry.name} VERSION`)"
        )
    return None
