"""train_one_epoch / evaluate: metrics arithmetic, progress events, cancellation."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterable, Iterator

import pytest
import torch
from torch import nn

from trainer.engine import Clock, ProgressEvent, TrainingCancelled, evaluate, train_one_epoch
from trainer.hardware import Hardware

CPU = Hardware(device=torch.device("cpu"), amp_dtype=None, channels_last=False)


def _batches(n: int, size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    return [(torch.randn(size, 3, 8, 8), torch.randint(0, 3, (size,))) for _ in range(n)]


def _tiny_model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))


def test_evaluate_counts_the_confusion_matrix() -> None:
    # The "model" returns its input: one-hot logits are the predictions themselves.
    predictions = torch.tensor([0, 0, 1, 2, 2, 2])
    labels = torch.tensor([0, 1, 1, 2, 2, 0])
    logits = nn.functional.one_hot(predictions, 3).float() * 10
    result = evaluate(nn.Identity(), nn.CrossEntropyLoss(), [(logits, labels)], CPU, 3)
    assert result.confusion == [[1, 0, 1], [1, 1, 0], [0, 0, 2]]
    assert result.accuracy == pytest.approx(4 / 6)
    assert result.per_class_accuracy == pytest.approx([0.5, 0.5, 1.0])
    assert result.images == 6
    assert result.loss == pytest.approx(nn.CrossEntropyLoss()(logits, labels).item(), rel=1e-5)


def test_progress_events_carry_batch_loss_rate_and_eta() -> None:
    model = _tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    events: list[ProgressEvent] = []
    calls = itertools.count()
    clock = Clock(epochs=2, batches_per_epoch=6, now=lambda: float(next(calls)))  # 1 s per call
    stats = train_one_epoch(
        model,
        nn.CrossEntropyLoss(),
        optimizer,
        None,
        _batches(6),
        CPU,
        epoch=0,
        clock=clock,
        on_event=events.append,
        log_every=2,
    )
    assert [e.batch for e in events] == [2, 4, 6]
    assert all(e.kind == "batch" and e.epochs == 2 and e.batches == 6 for e in events)
    assert all(e.images_per_second > 0 for e in events)
    # The clock was read at the start and at each event (1, 2, 3 s): 0.5 s per batch so far,
    # times the batches left of both epochs (10, 8, 6).
    assert [e.eta_seconds for e in events] == [5.0, 4.0, 3.0]
    assert stats.images == 24 and stats.batches == 6


def test_data_wait_ratio_is_the_share_of_step_time_spent_waiting_for_batches() -> None:
    def slow(batches: list) -> Iterator:
        for batch in batches:
            time.sleep(0.2)  # a loader far slower than this model's step, even on a busy host
            yield batch

    def ratio(batches: Iterable) -> float:
        model = _tiny_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        clock = Clock(epochs=1, batches_per_epoch=4)
        loss = nn.CrossEntropyLoss()
        stats = train_one_epoch(model, loss, optimizer, None, batches, CPU, epoch=0, clock=clock)
        return stats.data_wait_ratio

    starved, fed = ratio(slow(_batches(4))), ratio(_batches(4))
    assert starved > 0.3, starved
    assert fed < starved, (fed, starved)


def test_cancel_stops_between_batches() -> None:
    model = _tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stop = threading.Event()
    seen: list[int] = []

    def after_batch(n: int) -> None:
        seen.append(n)
        if len(seen) == 2:
            stop.set()

    with pytest.raises(TrainingCancelled, match="epoch 0 at batch 2"):
        train_one_epoch(
            model,
            nn.CrossEntropyLoss(),
            optimizer,
            None,
            _batches(5),
            CPU,
            epoch=0,
            clock=Clock(1, 5),
            cancel=stop.is_set,
            on_batch=after_batch,
        )
    assert seen == [4, 4]  # two batches trained, the third never started


def test_training_moves_the_loss_down() -> None:
    model = _tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    data = _batches(4) * 5
    first = train_one_epoch(
        model, nn.CrossEntropyLoss(), optimizer, None, data[:4], CPU, epoch=0, clock=Clock(2, 4)
    )
    last = train_one_epoch(
        model, nn.CrossEntropyLoss(), optimizer, None, data, CPU, epoch=1, clock=Clock(2, 4)
    )
    assert last.loss < first.loss
