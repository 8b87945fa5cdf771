"""The warm-worker budget: which versions give way so that at most ``max_warm`` hold a worker.

Starting a default (a promotion, ``warm_defaults``, a Predict for a default the budget stopped)
stops versions that are not a default first, then young candidates (published within
``candidate_warm_s``), then defaults, each group least recently used first. Starting any other
version stops only versions that are neither a default nor a young candidate: when those are too
few, the start is refused (RESOURCE_EXHAUSTED) and nothing is stopped. service/workers.py holds
the state this decides on and makes the stops.
"""

from __future__ import annotations

from dataclasses import dataclass

from refit.errors import ResourceExhausted
from service.worker_use import Key


@dataclass(frozen=True)
class Budget:
    max_warm: int  # 0: no bound

    def victims(
        self,
        *,
        warm: set[Key],
        stoppable: set[Key],
        extra: Key | None,
        defaults: set[Key],
        young: set[Key],
        last_used: dict[Key, float],
    ) -> list[Key]:
        """The versions to stop (from ``stoppable``) so that ``warm`` fits the budget; ``warm``
        includes ``extra``, the version being started, if any."""
        excess = len(warm) - self.max_warm
        if not self.max_warm or excess <= 0:
            return []
        order = sorted(stoppable, key=lambda k: (k in defaults, k in young, last_used.get(k, 0.0)))
        if extra is not None and extra not in defaults:
            order = [k for k in order if k not in defaults | young]
            if len(order) < excess:
                raise self.full(extra)
        return order[:excess]

    def full(self, key: Key) -> ResourceExhausted:
        model, version = key
        return ResourceExhausted(
            f"{model} v{version} is not started: all {self.max_warm} warm workers "
            "(REFIT_MAX_WARM_WORKERS) serve defaults, candidates published within "
            "REFIT_CANDIDATE_WARM_S, or Predicts in progress, and none of those is stopped for "
            "a version that is not a default; retry later, or raise REFIT_MAX_WARM_WORKERS"
        )
