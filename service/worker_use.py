"""Which versions were used, as every service replica sees it: read from TorchServe itself.

Use decides which versions lose their worker as idle, and which go first when the budget is full
(service/workers.py). Each service replica judging from its own Predicts stopped, every idle
period, versions another replica was serving (issue 23). TorchServe's own per-version inference
counters (``ts_inference_requests_total``, on each replica's metrics API, REFIT_TORCHSERVE_METRICS)
move with every request it receives, from any service replica or the publisher's smoke tests, before
it is queued: one truth every replica reads the same way, at the cost of one GET per TorchServe
replica per housekeeping pass and no write. Recording use in the registry instead would put an
object-store write on every Predict (or every pass, per version, per service replica) and still
lag by that interval.

- ``read``: the versions whose count moved on any replica since the previous read. A count that
  went down is a restarted replica, whose count since its start is new use; a replica read for
  the first time counts what it shows as use.
- ``started``: a start is a use too, whoever made it: a Predict waiting for a worker reaches the
  counters only once the worker is up. So before a version is stopped as idle every replica is
  asked for its workers (TorchServe's describe): one still starting, or started within
  ``idle_s``, keeps it.

If any replica's counters, or its workers, cannot be read, nothing is judged unused that round:
the unread replica may be the one serving it (logged once per outage, and counted in
``refit_worker_usage_reads_total``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

from refit.errors import RefitError
from refit.torchserve import TorchServeClient
from service import metrics

if TYPE_CHECKING:
    from service.workers import WorkerPolicy

log = logging.getLogger(__name__)
Key = tuple[str, str]  # (model, version)
Counts = dict[str, dict[Key, float]]  # TorchServe replica -> inference requests per version


class SharedUse:
    def __init__(
        self,
        torchserve: TorchServeClient,
        policy: WorkerPolicy,
        clock: Callable[[], float],
        wall: Callable[[], float],
    ) -> None:
        self.torchserve, self.policy = torchserve, policy
        self.clock, self.wall = clock, wall
        self._counts: Counts = {}  # the last read of the counters
        self._readable = True

    def read(self) -> set[Key] | None:
        """Versions used since the last read; None when some replica's counters cannot be read.
        A request naming no version is counted under version "default"."""
        try:
            counts = self.torchserve.inference_counts()
        except RefitError as exc:
            metrics.WORKER_USAGE_READS.labels("failed").inc()
            if self._readable:  # once per outage, not every pass
                log.warning(
                    "TorchServe's inference counters cannot be read (%s): no version is stopped "
                    "as idle until they can",
                    exc.message,
                )
            self._readable = False
            return None
        metrics.WORKER_USAGE_READS.labels("ok").inc()
        if not self._readable:
            log.info("TorchServe's inference counters can be read again")
        self._readable = True
        used, self._counts = moved(self._counts, counts), counts
        return used

    def started(self, key: Key) -> float | Literal[False] | None:
        """When a replica last started the version's worker, as a use (this clock's time): now
        for a worker still starting (within ``scale_up_timeout_s``), its start for one started
        within ``idle_s``; None when neither holds on any replica; False when some replica
        cannot describe it (never judged on part of the truth)."""
        try:
            served = self.torchserve.describe(*key)
        except RefitError as exc:
            log.info("not stopping %s v%s as idle this round: %s", *key, exc.message)
            return False
        now, wall = self.clock(), self.wall()
        used = None
        for version in filter(None, served):
            age = max(wall - version.started_at, 0.0)
            if version.starting and age < self.policy.scale_up_timeout_s:
                used = now
            elif age < self.policy.idle_s:
                used = max(used or 0.0, now - age)
        return used


def moved(before: Counts, after: Counts) -> set[Key]:
    """Versions whose inference count went up on some replica between two reads. A count that
    went down is a restarted replica: what it shows now is new use; so is what a replica not
    read before shows."""
    used = set()
    for replica, counts in after.items():
        seen = before.get(replica, {})
        for key, count in counts.items():
            last = seen.get(key, 0.0)
            if count > last or 0 < count < last:
                used.add(key)
    return used
