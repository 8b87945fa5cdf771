"""The job runner's progress sink: engine events -> job states and watcher progress."""

from __future__ import annotations

import math

from trainer.engine import ProgressEvent
from trainer.jobs.records import EXPORTING, TRAINING
from trainer.jobs.runner import _ProgressSink


class Context:
    def __init__(self) -> None:
        self.states: list[str] = []
        self.progress_seen: list[tuple[dict, bool]] = []

    def set_state(self, state: str) -> None:
        self.states.append(state)

    def progress(self, progress: dict, *, persist: bool) -> None:
        self.progress_seen.append((progress, persist))


def event(kind: str, epoch: int, batch: int, eta: float = 10.0) -> ProgressEvent:
    val = {"loss": 0.5, "accuracy": 0.75} if kind == "epoch" else None
    return ProgressEvent(kind, epoch, 2, batch, 4, 1.0, 0.5, 30.0, eta, val=val)


def test_sink_starts_training_throttles_batches_and_exports_after_the_last_epoch() -> None:
    context = Context()
    sink = _ProgressSink(context, every=2)
    sink(event("batch", 0, 1, eta=math.inf))
    assert context.states == [TRAINING] and not context.progress_seen  # batch 1: throttled
    for batch in (2, 3, 4):
        sink(event("batch", 0, batch))
    sink(event("epoch", 0, 4))
    sink(event("epoch", 1, 4))
    assert context.states == [TRAINING, EXPORTING]
    seen = context.progress_seen
    sent = [(p["epoch"], p["batch"], p["epoch_end"], persist) for p, persist in seen]
    assert sent == [(1, 2, False, False), (1, 4, False, False), (1, 4, True, True),
                    (2, 4, True, True)]  # fmt: skip
    assert context.progress_seen[2][0]["val_accuracy"] == 0.75
    sink2 = _ProgressSink(Context(), every=1)
    sink2(event("batch", 0, 1, eta=math.inf))
    assert sink2.context.progress_seen[0][0]["eta_seconds"] == -1.0  # unknown yet
