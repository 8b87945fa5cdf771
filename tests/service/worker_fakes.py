"""A recording stand-in for TorchServe and a clock the test moves, for the worker tests."""

from __future__ import annotations

import time
from types import SimpleNamespace

from refit.torchserve import ServedVersion
from service.workers import Observation, WorkerPolicy, Workers

A1, A2, B1, B2 = ("a", "1"), ("a", "2"), ("b", "1"), ("b", "2")
C1, C2 = ("c", "1"), ("c", "2")


class RecordingTorchServe:
    """Scale calls are recorded; ``counts`` (replica -> (model, version) -> requests) stands
    for TorchServe's inference counters when ``metrics`` names replicas, and ``unreadable``
    makes reading them fail."""

    def __init__(
        self,
        start_s: float = 0.0,
        fail: Exception | None = None,
        stop_s: float = 0.0,
        metrics: tuple[str, ...] = (),
    ) -> None:
        self.targets = SimpleNamespace(rest=("127.0.0.1:1",), metrics=metrics)
        self.calls: list[tuple[str, str, int]] = []
        self.start_s, self.fail, self.stop_s = start_s, fail, stop_s
        self.counts: dict[str, dict[tuple[str, str], float]] = {name: {} for name in metrics}
        self.unreadable: Exception | None = None
        self.workers_started: dict[tuple[str, str], tuple[float, bool]] = {}  # (at, ready)
        self.undescribable: Exception | None = None

    def inference_counts(self) -> dict[str, dict[tuple[str, str], float]]:
        if self.unreadable is not None:
            raise self.unreadable
        return {name: dict(counts) for name, counts in self.counts.items()}

    def describe(self, model: str, version: str) -> list[ServedVersion | None]:
        """Every replica alike: the version's worker as ``workers_started`` says (none else)."""
        if self.undescribable is not None:
            raise self.undescribable
        at, ready = self.workers_started.get((model, version), (0.0, True))
        served = ServedVersion(model, version, 1, started_at=at, starting=not ready)
        return [served for _ in self.counts]

    def used(self, replica: str, key: tuple[str, str], times: int = 1) -> None:
        """Predicts through any service (or the publisher) reaching ``replica``."""
        self.counts[replica][key] = self.counts[replica].get(key, 0.0) + times

    def scale(self, model: str, version: str, workers: int, timeout_s: float) -> None:
        self.calls.append((model, version, workers))
        time.sleep(0 if workers else self.stop_s)
        if workers:
            time.sleep(self.start_s)
            if self.fail:
                raise self.fail


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def workers_with(
    torchserve: RecordingTorchServe, holding: set, defaults: set, clock: Clock, **policy
) -> Workers:
    workers = Workers(torchserve, WorkerPolicy(**policy), clock=clock, wall=lambda: 1e9)
    registered = {A1, A2, B1, B2}
    workers.observe(Observation(registered, holding, holding, defaults, {}))
    return workers
