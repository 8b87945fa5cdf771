"""Keeps every TorchServe replica in step with the registry, and decides the Predict rotation.

The registry in the object store is the truth (service/catalog.py caches it). A pass re-reads
it and brings every TorchServe replica in step (service/replica_sync.py), at start-up, every
``REFIT_RECONCILE_INTERVAL_S`` and whenever the watch (service/watch.py) or a failing Predict
asks for one, sooner when a refused version or SetDefault is due for a retry. Each pass ends by
deciding which replicas get Predicts and whether the service is ready (service/rotation.py),
and tells ``Workers`` what each replica runs.

A pass whose registry read fails goes on with the cached records: the service degrades (no new
versions), it does not stop serving. With nothing cached yet the pass fails instead.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime

from refit.errors import Unavailable
from refit.retry import Backoff
from refit.storage import ObjectStore
from refit.torchserve import ReplicaClient, TorchServeClient
from service import metrics
from service.catalog import ModelCatalog, ModelEntry
from service.replica_sync import DefaultRetries, ReplicaSync, WorkerCounts
from service.rotation import (
    FAILED,
    REGISTERED,
    SEVERITY,
    Registration,
    Registrations,
    Rotation,
    decide,
    model_problems,
)
from service.workers import Observation, Workers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RotationView:
    """What the watch checks between passes."""

    reachable: dict[str, bool]  # replica -> it answered in the last pass
    rotation: set[str]  # replicas that get Predicts
    expected: frozenset[str]  # models each replica in rotation must list


class Reconciler:
    def __init__(
        self,
        catalog: ModelCatalog,
        store: ObjectStore,
        bucket: str,
        torchserve: TorchServeClient,
        retry: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
        workers: Workers | None = None,
    ) -> None:
        self.catalog = catalog
        self.torchserve = torchserve
        self.retry = retry or Backoff(2.0, 300.0)
        self.clock = clock
        self.workers = workers
        self.sync = ReplicaSync(store, bucket, self.retry, clock, workers)
        self.healthy = threading.Event()  # set while the service is ready (service/rotation.py)
        self._registrations: Registrations = {}
        self._problems: dict[str, str] = {}
        self._reachable: dict[str, bool] = {}
        self._decision = Rotation(frozenset(), frozenset(), {})
        self._rotation: set[str] = set()  # replicas that get Predicts (the watch may remove some)
        self._lock = threading.Lock()
        self._wake = threading.Event()

    # --- what GetModel shows ---------------------------------------------------------------------

    def registration(self, model: str, version: str) -> Registration:
        """The worst state over the replicas (failed, then pending), naming that replica when
        there are several; ``registrations`` has each replica's own."""
        states = self.registrations(model, version)
        if not states:
            return Registration()
        worst = max(states, key=lambda r: SEVERITY[r.state])
        if len(states) > 1 and worst.state != REGISTERED:
            return replace(worst, error=f"replica {worst.replica}: {worst.error or 'not loaded'}")
        return worst

    def registrations(self, model: str, version: str) -> list[Registration]:
        with self._lock:
            return list(self._registrations.get((model, version), {}).values())

    def problem(self, model: str) -> str:
        """The model's own problem, and the registry's staleness during a store outage."""
        with self._lock:
            own = self._problems.get(model, "")
        return "; ".join(p for p in (own, self.catalog.stale()) if p)

    def wake(self) -> None:
        """Asks for a pass soon: a Predict found TorchServe without a version, or unreachable."""
        self._wake.set()

    # --- what the watch checks -------------------------------------------------------------------

    def view(self) -> RotationView:
        with self._lock:
            return RotationView(dict(self._reachable), set(self._rotation), self._decision.required)

    def take_out(self, failing: set[str], replicas: list[ReplicaClient]) -> None:
        """Replicas the watch found failing leave the rotation now, before the next pass."""
        log.warning("TorchServe replicas %s leave the rotation", ", ".join(sorted(failing)))
        with self._lock:
            self._rotation -= failing
            rotation, reachable = set(self._rotation), dict(self._reachable)
        self.torchserve.set_rotation([r for r in replicas if r.name in rotation])
        metrics.observe_replicas({**reachable, **dict.fromkeys(failing, False)}, rotation)

    # --- one pass --------------------------------------------------------------------------------

    def run_once(self) -> int:
        """One pass over every replica; returns how many registrations it made. Raises only
        when nothing can be decided: no replica answered, or the registry was never read."""
        store_up = self._read_registry()
        entries = self.catalog.models()
        replicas = self.torchserve.replicas()
        registrations: Registrations = {}
        reachable: dict[str, bool] = {}
        counts: list[WorkerCounts] = []
        retries: DefaultRetries = {}
        previous = self._registrations  # the last pass's: only _publish (this thread) replaces it
        registered = 0
        for replica in replicas:
            try:
                made, replica_counts = self.sync.sync(
                    replica, entries, previous, registrations, retries
                )
            except Unavailable as exc:
                reachable[replica.name] = False
                self.sync.mark_unreachable(replica, entries, previous, registrations, exc.message)
                continue
            reachable[replica.name] = True
            counts.append(replica_counts)
            registered += made
        if not any(reachable.values()):
            with self._lock:
                self._reachable = reachable
            metrics.observe_replicas(reachable, set())
            raise Unavailable("no TorchServe replica answered; retrying")
        self.sync.default_retries = retries
        with self._lock:
            refused_before = None if store_up else self._decision.refused
        defaults = {
            e.name: e.default_version
            for e in entries
            if e.default_version and e.default_problem() is None
        }
        decision = decide(defaults, registrations, reachable, refused_before)
        self._publish(replicas, entries, registrations, reachable, decision)
        if self.workers is not None:
            self.workers.observe(_observation(entries, counts))
            self.workers.warm_defaults()
        return registered

    def _read_registry(self) -> bool:
        """Re-reads the registry; False when it could not be read and the pass goes on with
        the cached view. Raises when nothing is cached: nothing could be served."""
        reason = self.catalog.try_refresh()
        if reason and not self.catalog.loaded:
            raise Unavailable(
                f"the model registry could not be read ({reason}) and nothing is cached yet"
            )
        return not reason

    def _publish(
        self,
        replicas: list[ReplicaClient],
        entries: list[ModelEntry],
        registrations: Registrations,
        reachable: dict[str, bool],
        decision: Rotation,
    ) -> None:
        """Applies a pass's decision: the Predict rotation, GetModel's view, metrics, health."""
        problems = model_problems(self.catalog.errors, entries, registrations, decision)
        # No replica in line (start-up, every replica restarted): try the reachable ones.
        rotation = [r for r in replicas if r.name in decision.in_line] or [
            r for r in replicas if reachable.get(r.name)
        ]
        self.torchserve.set_rotation(rotation)
        with self._lock:
            self._registrations, self._problems = registrations, problems
            self._reachable, self._decision = reachable, decision
            self._rotation = set(decision.in_line)
        metrics.observe_registrations(
            {
                (model, version, replica): reg.state
                for (model, version), states in registrations.items()
                for replica, reg in states.items()
            },
            problems,
        )
        metrics.observe_replicas(reachable, set(decision.in_line))
        if decision.ready:
            self.healthy.set()
        else:
            self.healthy.clear()

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
            due = [
                r.retry_at
                for states in self._registrations.values()
                for r in states.values()
                if r.state == FAILED
            ]
            unreachable = not all(self._reachable.values())
        due += [retry_at for _, retry_at in self.sync.default_retries.values()]
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
