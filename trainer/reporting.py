"""What a completed epoch tells the outside: a progress event for watchers, the trainer's
Prometheus gauges, and a line of the run's history."""

from __future__ import annotations

import torch

from trainer import metrics
from trainer.engine import Clock, EpochStats, EvalResult, EventSink, ProgressEvent
from trainer.hardware import Hardware


def history_entry(epoch: int, stats: EpochStats, result: EvalResult) -> dict:
    return {
        "epoch": epoch,
        "train_loss": stats.loss,
        "train_accuracy": stats.accuracy,
        "val_loss": result.loss,
        "val_accuracy": result.accuracy,
        "images_per_second": stats.images_per_second,
        "data_wait_ratio": stats.data_wait_ratio,
    }


def report_epoch(
    sink: EventSink | None,
    epoch: int,
    stats: EpochStats,
    result: EvalResult,
    clock: Clock,
    hw: Hardware,
) -> None:
    if sink is not None:
        sink(epoch_event(epoch, stats, result, clock))
    update_metrics(epoch, stats, result, hw)


def epoch_event(epoch: int, stats: EpochStats, result: EvalResult, clock: Clock) -> ProgressEvent:
    return ProgressEvent(
        kind="epoch",
        epoch=epoch,
        epochs=clock.epochs,
        batch=stats.batches,
        batches=clock.batches_per_epoch,
        loss=stats.loss,
        accuracy=stats.accuracy,
        images_per_second=stats.images_per_second,
        eta_seconds=clock.eta(epoch + 1, 0),
        data_wait_ratio=stats.data_wait_ratio,
        val={"loss": result.loss, "accuracy": result.accuracy},
    )


def update_metrics(epoch: int, stats: EpochStats, result: EvalResult, hw: Hardware) -> None:
    metrics.TRAINER_EPOCH.set(epoch + 1)
    metrics.TRAINER_LOSS.labels("train").set(stats.loss)
    metrics.TRAINER_LOSS.labels("val").set(result.loss)
    metrics.TRAINER_ACCURACY.labels("train").set(stats.accuracy)
    metrics.TRAINER_ACCURACY.labels("val").set(result.accuracy)
    metrics.TRAINER_IMAGES_PER_SECOND.set(stats.images_per_second)
    metrics.TRAINER_DATA_WAIT_RATIO.set(stats.data_wait_ratio)
    # 0 on CPU, as documented: an absent series would leave the panel saying nothing.
    gpu_bytes = torch.cuda.max_memory_allocated(hw.device) if hw.device.type == "cuda" else 0
    metrics.TRAINER_GPU_MEMORY_BYTES.set(gpu_bytes)
