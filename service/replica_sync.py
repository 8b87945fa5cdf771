"""Brings one TorchServe replica in step with the registry, for the reconciler's pass
(service/reconciler.py): every published version registered, each default restored.

Versions are registered without a TorchServe worker, except each model's default (one worker,
within the ``Workers`` budget): workers for the rest start on demand (service/workers.py).
Each version is reconciled on its own: one that TorchServe refuses (a broken archive) is
reported (log, metrics, its registration in GetModel) and retried with exponential backoff, and
the others go on. An archive's URL is signed locally, so registering needs no store call (while
the store is down TorchServe may still fail to fetch the archive).

TorchServe's default is set only when this service has not set it on that replica yet
(TorchServe 0.12's describe does not say which version is the default), so a pass where nothing
changed makes no management call but the listing and the describes. A SetDefault that fails is
logged, counted and retried with backoff; it never takes a replica out of the rotation
(service/rotation.py): every Predict names its version.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from refit.archives import ArchiveCheck
from refit.errors import RefitError, Unavailable
from refit.registry import VersionRecord
from refit.retry import Backoff
from refit.storage import ObjectStore
from refit.torchserve import ReplicaClient, ServedVersion
from service import metrics
from service.catalog import ModelEntry
from service.rotation import FAILED, PENDING, REGISTERED, Registration, Registrations
from service.workers import Workers

log = logging.getLogger(__name__)
WorkerCounts = dict[tuple[str, str], int]  # one replica: (model, version) -> its workers there
# (replica, model) -> SetDefault failures in a row, and when to retry
DefaultRetries = dict[tuple[str, str], tuple[int, float]]


class ReplicaSync:
    def __init__(
        self,
        store: ObjectStore,
        bucket: str,
        retry: Backoff,
        clock: Callable[[], float],
        workers: Workers | None,
    ) -> None:
        self.store = store
        self.bucket = bucket
        self.archives = ArchiveCheck(store, bucket)  # each archive checked before registration
        self.retry = retry
        self.clock = clock
        self.workers = workers
        # replica -> model -> the default this service set there (forgotten when the replica
        # is unreachable or lost the version: it may have restarted)
        self._defaults_set: dict[str, dict[str, str]] = {}
        self.default_retries: DefaultRetries = {}  # the SetDefaults the last pass must retry

    def sync(
        self,
        replica: ReplicaClient,
        entries: list[ModelEntry],
        previous: Registrations,
        registrations: Registrations,
        retries: DefaultRetries,
    ) -> tuple[int, WorkerCounts]:
        """Every version and default on one replica, into ``registrations`` (``previous``: the
        last pass's; SetDefaults to retry go into ``retries``). Returns the registrations it
        made and the workers each version has there now. Raises Unavailable when the replica
        does not answer."""
        served = {(v.model, v.version): v for v in replica.served_versions()}
        mine = {(e.name, r.version) for e in entries for r in e.versions}
        counts = {key: version.workers for key, version in served.items() if key in mine}
        made = 0
        for entry in entries:
            records = sorted(entry.versions, key=lambda r: r.version != entry.default_version)
            for record in records:  # the default first: it decides whether the replica is in line
                key = (entry.name, record.version)
                workers = self._workers_at_registration(entry, record, counts)
                before = previous.get(key, {}).get(replica.name, Registration())
                state = self._reconcile_version(replica, record, served, before, workers)
                registrations.setdefault(key, {})[replica.name] = state
                if key not in served and state.state == REGISTERED:
                    made += 1
                    counts[key] = workers
            if entry.default_problem() is None:
                failed = self._restore_default(replica, entry, served, registrations)
                if failed is not None:
                    retries[(replica.name, entry.name)] = failed
        return made, counts

    def mark_unreachable(
        self,
        replica: ReplicaClient,
        entries: list[ModelEntry],
        previous: Registrations,
        registrations: Registrations,
        reason: str,
    ) -> None:
        log.warning("TorchServe replica %s is unreachable: %s", replica.name, reason)
        self._defaults_set.pop(replica.name, None)  # it may come back restarted
        for entry in entries:
            for record in entry.versions:
                key = (entry.name, record.version)
                before = previous.get(key, {}).get(replica.name, Registration())
                registrations.setdefault(key, {})[replica.name] = Registration(
                    PENDING, f"unreachable: {reason}", before.attempts, before.retry_at,
                    replica.name,
                )  # fmt: skip

    def _workers_at_registration(
        self, entry: ModelEntry, record: VersionRecord, counts: WorkerCounts
    ) -> int:
        """A default gets a worker (within the budget); every other version starts on demand."""
        if record.version != entry.default_version:
            return 0
        if self.workers is None:
            return 1
        return self.workers.default_workers(sum(1 for n in counts.values() if n))

    def _reconcile_version(
        self,
        replica: ReplicaClient,
        record: VersionRecord,
        served: dict[tuple[str, str], ServedVersion],
        previous: Registration,
        workers: int = 0,
    ) -> Registration:
        key = (record.model, record.version)
        if key in served:
            return Registration(REGISTERED, replica=replica.name)
        if previous.state == FAILED and self.clock() < previous.retry_at:
            return previous  # backing off
        log.info("registering %s v%s with TorchServe replica %s", *key, replica.name)
        try:
            replica.ensure(
                record.model,
                record.version,
                self.archives.url(record.archive_key),
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
    ) -> tuple[int, float] | None:
        """Makes the replica's default the registry's. Calls TorchServe only when this service
        has not set that default there yet, or the replica had lost the version (restarted).
        Returns, after a failure, the failures in a row and when to retry."""
        default = entry.default_version or ""
        key = (entry.name, default)
        if registrations[key][replica.name].state != REGISTERED:
            return None
        defaults_set = self._defaults_set.setdefault(replica.name, {})
        if key in served and defaults_set.get(entry.name) == default:
            return None
        defaults_set.pop(entry.name, None)
        try:
            replica.set_default(entry.name, default)
        except Unavailable:
            raise
        except RefitError as exc:
            attempts = self.default_retries.get((replica.name, entry.name), (0, 0.0))[0] + 1
            delay = self.retry.delay(attempts)
            metrics.SET_DEFAULT_FAILURES.labels(entry.name).inc()
            log.warning(
                "cannot make v%s the default of %s on %s (attempt %d; retrying in %.0fs; "
                "Predicts name their version and are not affected): %s",
                default, entry.name, replica.name, attempts, delay, exc.message,
            )  # fmt: skip
            return attempts, self.clock() + delay
        defaults_set[entry.name] = default
        return None
