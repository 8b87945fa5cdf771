"""One epoch of training and one pass of evaluation, shaped like torchvision's
references/classification/train.py, plus progress events and cancellation between batches.

In a distributed run every rank checks, before each step, that all ranks still have a batch and
none was cancelled (one tiny all-reduce): streamed shards can differ by a batch, and a rank that
steps alone would hang the others' gradient all-reduce.

A training batch of one image is not stepped on: BatchNorm cannot normalise a single value per
channel (a 1x1 feature map, e.g. EfficientNet's last stage at crops under 64 pixels), and only
the end of an epoch's stream leaves one. Its image still counts as read (a resume does not
reread it), and the epoch's shuffle puts another image last next time. When any rank holds such a
batch, every rank skips that step, so none steps alone.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from trainer.hardware import Hardware, sum_across_ranks
from trainer.transforms import BatchMix

CancelCheck = Callable[[], bool]  # e.g. threading.Event().is_set


class TrainingCancelled(Exception):
    def __init__(self, message: str = "training was cancelled") -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class ProgressEvent:
    """What a watcher sees: one per ``log_every`` batches (kind "batch") and per epoch ("epoch")."""

    kind: str
    epoch: int  # 0-based
    epochs: int
    batch: int  # batches done in this epoch
    batches: int  # expected batches per epoch (an estimate for streamed data)
    loss: float
    accuracy: float
    images_per_second: float
    eta_seconds: float
    data_wait_ratio: float = 0.0
    val: dict | None = None  # epoch events: val loss/accuracy


EventSink = Callable[[ProgressEvent], None]


@dataclass
class EpochStats:
    loss: float = 0.0
    accuracy: float = 0.0
    images: int = 0
    batches: int = 0
    seconds: float = 0.0
    data_seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    @property
    def data_wait_ratio(self) -> float:
        return self.data_seconds / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    per_class_accuracy: list[float]
    confusion: list[list[int]]  # rows: true class, columns: predicted class
    images: int

    def as_dict(self, class_names: list[str]) -> dict:
        return {
            "loss": self.loss,
            "accuracy": self.accuracy,
            "per_class_accuracy": dict(zip(class_names, self.per_class_accuracy, strict=True)),
            "confusion": self.confusion,
            "images": self.images,
        }


@dataclass
class Clock:
    """Estimates time left over the whole run from the measured batch rate."""

    epochs: int
    batches_per_epoch: int
    now: Callable[[], float] = time.perf_counter  # seconds; tests pass a steady fake
    start: float = field(init=False)
    done: int = 0

    def __post_init__(self) -> None:
        self.start = self.now()

    def tick(self) -> None:
        self.done += 1

    def eta(self, epoch: int, batch: int) -> float:
        """Seconds left when ``batch`` batches of ``epoch`` (0-based) are done."""
        if not self.done:
            return math.inf
        remaining = (self.epochs - epoch) * self.batches_per_epoch - batch
        rate = (self.now() - self.start) / self.done
        return max(remaining, 0) * rate


def autocast(hw: Hardware) -> contextlib.AbstractContextManager:
    if hw.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=hw.device.type, dtype=hw.amp_dtype)


def to_device(images: torch.Tensor, labels: torch.Tensor, hw: Hardware) -> tuple:
    images = images.to(hw.device, non_blocking=True, memory_format=hw.memory_format())
    return images, labels.to(hw.device, non_blocking=True)


@dataclass(frozen=True)
class _Agreed:
    """What every rank does next, the same on all of them."""

    stop: bool  # some rank has no batch left
    cancelled: bool
    skip: bool  # some rank's batch holds one image (see the module docstring)


def _agree(batch: tuple | None, cancel: CancelCheck | None, hw: Hardware) -> _Agreed:
    flags = torch.tensor(
        [batch is None, bool(cancel and cancel()), batch is not None and len(batch[1]) == 1]
    )
    flags = sum_across_ranks(flags.long(), hw)
    return _Agreed(stop=bool(flags[0]), cancelled=bool(flags[1]), skip=bool(flags[2]))


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    loader: Iterable,
    hw: Hardware,
    *,
    epoch: int,
    clock: Clock,
    scaler: torch.amp.GradScaler | None = None,
    on_event: EventSink | None = None,
    cancel: CancelCheck | None = None,
    log_every: int = 10,
    on_batch: Callable[[int], None] | None = None,
    mix: BatchMix | None = None,
    ema: AveragedModel | None = None,
) -> EpochStats:
    """Train one pass over ``loader``; raises TrainingCancelled when ``cancel()`` turns true.
    ``mix`` turns a batch into mixed images and soft targets (MixUp/CutMix); ``ema`` is updated
    after every step."""
    model.train()
    stats = EpochStats()
    loss_sum = torch.zeros((), device=hw.device)
    correct = torch.zeros((), device=hw.device, dtype=torch.long)
    start = time.perf_counter()
    batches = iter(loader)
    while True:
        waited = time.perf_counter()
        batch = next(batches, None)
        stats.data_seconds += time.perf_counter() - waited
        agreed = _agree(batch, cancel, hw)
        if agreed.cancelled:
            raise TrainingCancelled(f"training cancelled in epoch {epoch} at batch {stats.batches}")
        if agreed.stop:
            break
        if agreed.skip:
            if on_batch is not None:
                on_batch(len(batch[1]))
            continue
        images, labels = to_device(*batch, hw)
        targets = labels
        if mix is not None:
            images, targets = mix(images, labels)
        with autocast(hw):
            logits = model(images)
            loss = criterion(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        loss_sum += loss.detach() * labels.size(0)
        correct += (logits.detach().argmax(1) == labels).sum()
        stats.images += labels.size(0)
        stats.batches += 1
        if on_batch is not None:
            on_batch(labels.size(0))  # the dataset's resume position
        clock.tick()
        if on_event is not None and stats.batches % log_every == 0:
            stats.seconds = time.perf_counter() - start
            _emit(on_event, "batch", epoch, stats, loss_sum, correct, clock)
    stats.seconds = time.perf_counter() - start
    totals = sum_across_ranks(
        torch.stack(
            [loss_sum.float(), correct.float(), torch.tensor(float(stats.images), device=hw.device)]
        ),
        hw,
    )
    stats.loss = (totals[0] / totals[2].clamp(min=1)).item()
    stats.accuracy = (totals[1] / totals[2].clamp(min=1)).item()
    return stats


def _emit(
    sink: EventSink,
    kind: str,
    epoch: int,
    stats: EpochStats,
    loss_sum: torch.Tensor,
    correct: torch.Tensor,
    clock: Clock,
) -> None:
    n = max(stats.images, 1)
    sink(
        ProgressEvent(
            kind=kind,
            epoch=epoch,
            epochs=clock.epochs,
            batch=stats.batches,
            batches=clock.batches_per_epoch,
            loss=loss_sum.item() / n,
            accuracy=correct.item() / n,
            images_per_second=stats.images_per_second,
            eta_seconds=clock.eta(epoch, stats.batches),
            data_wait_ratio=stats.data_wait_ratio,
        )
    )


@torch.inference_mode()
def evaluate(
    model: nn.Module, criterion: nn.Module, loader: Iterable, hw: Hardware, num_classes: int
) -> EvalResult:
    """Loss, accuracy, per-class accuracy and confusion matrix, summed over all ranks' shards."""
    model.eval()
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long, device=hw.device)
    loss_sum = torch.zeros((), device=hw.device)
    for batch in loader:
        images, labels = to_device(*batch, hw)
        with autocast(hw):
            logits = model(images)
        loss_sum += criterion(logits.float(), labels) * labels.size(0)
        cells = labels * num_classes + logits.argmax(1)
        confusion += torch.bincount(cells, minlength=num_classes * num_classes)
    confusion = sum_across_ranks(confusion, hw).view(num_classes, num_classes).cpu()
    loss_total = sum_across_ranks(loss_sum.reshape(1), hw).item()
    images = int(confusion.sum())
    per_class = confusion.diag().float() / confusion.sum(1).clamp(min=1).float()
    return EvalResult(
        loss=loss_total / max(images, 1),
        accuracy=confusion.diag().sum().item() / max(images, 1),
        per_class_accuracy=per_class.tolist(),
        confusion=confusion.tolist(),
        images=images,
    )
