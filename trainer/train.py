"""Fine-tune a backbone on a streamed dataset, then export, package and store the result.

Shaped like torchvision's references/classification/train.py: ``get_args_parser()``,
``main(args)``; the loop pieces are ``trainer.engine.train_one_epoch`` and ``evaluate``.
``train_and_package(config, store)`` is the one call a job runner needs.

Single process:   python -m trainer.train --dataset s3://data/flowers --out flowers
Several GPUs/CPUs: torchrun --nproc-per-node 2 -m trainer.train --dataset ... --out ...
"""

from __future__ import annotations

import argparse
import logging
import math
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from refit.registry import Registry
from refit.storage import ObjectStore, StorageSettings
from trainer import metrics
from trainer.backbones import (
    BackboneError,
    BackboneRegistry,
    WeightsSource,
    build_backbone,
    replace_head,
)
from trainer.checkpoint import CheckpointStore, load_weights, save_weights, weights_key
from trainer.config import TrainConfig, add_arguments, config_from_args
from trainer.engine import (
    CancelCheck,
    Clock,
    EpochStats,
    EvalResult,
    EventSink,
    ProgressEvent,
    evaluate,
    train_one_epoch,
)
from trainer.finetune import FineTuneModel, resolve_freeze
from trainer.hardware import (
    Hardware,
    check_ranks_agree,
    loader_workers,
    setup_hardware,
    sum_across_ranks,
    sync_buffers,
    teardown,
)
from trainer.package import Preprocessing, build_archive
from trainer.transforms import Transform, eval_transform, train_transform

log = logging.getLogger(__name__)


class StreamingDataset(Protocol):
    """What the loop needs from a dataset (trainer.data.open_dataset returns one)."""

    class_names: list[str]
    num_samples: int  # this split, all ranks
    num_objects: int
    digest: str

    def __iter__(self) -> Iterable: ...
    def set_epoch(self, epoch: int) -> None: ...
    def advance(self, n: int) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True)
class Datasets:
    train: StreamingDataset
    val: StreamingDataset


DatasetOpener = Callable[[TrainConfig, ObjectStore, Hardware, Transform, Transform], Datasets]


def open_datasets(
    config: TrainConfig, store: ObjectStore, hw: Hardware, train_tf: Transform, eval_tf: Transform
) -> Datasets:
    from trainer.data import ReadOptions, open_dataset

    common = {
        "options": ReadOptions(batch_size=config.batch_size),  # exact resume across workers
        "store": store,
        "val_fraction": config.val_fraction,
        "seed": config.seed,
        "rank": hw.rank,
        "world_size": hw.world_size,
    }
    return Datasets(
        train=open_dataset(
            config.dataset, split="train", transform=train_tf, shuffle=True, **common
        ),
        val=open_dataset(config.dataset, split="val", transform=eval_tf, shuffle=False, **common),
    )


class StartingPointError(BackboneError):
    pass


def build_model(
    config: TrainConfig,
    store: ObjectStore,
    class_names: list[str],
    backbones: BackboneRegistry,
) -> tuple[FineTuneModel, dict]:
    """The model to fine-tune and where it came from (for the lineage)."""
    if config.init_from is not None:
        return _from_published(config, store, class_names, backbones)
    spec = backbones.get(config.backbone)
    source = WeightsSource(store=store, uri=config.weights_uri)
    net = build_backbone(spec, len(class_names), pretrained=config.pretrained, weights=source)
    start = "imagenet" if config.pretrained else "random"
    return FineTuneModel(net, spec), {"backbone": spec.name, "start": start}


def _from_published(
    config: TrainConfig,
    store: ObjectStore,
    class_names: list[str],
    backbones: BackboneRegistry,
) -> tuple[FineTuneModel, dict]:
    model_name, version = config.init_from.split(":", 1)
    record = Registry(store, config.bucket).get(model_name, version)
    key = record.lineage.get("weights_key")
    if not key:
        raise StartingPointError(
            f"{model_name} v{version} has no weights object in its lineage (it was not trained "
            "by refit train); start from its backbone instead: --backbone "
            f"{record.lineage.get('backbone', 'efficientnet_lite0')}"
        )
    saved = load_weights(store, config.bucket, key)
    spec = backbones.get(saved["backbone"])
    net = spec.build()
    replace_head(net, spec, len(saved["class_names"]))
    net.load_state_dict(saved["state_dict"])
    if list(saved["class_names"]) != list(class_names):
        replace_head(net, spec, len(class_names))  # other classes: only the body carries over
    lineage = {
        "backbone": spec.name,
        "start": f"{model_name}:{version}",
        "parent": {"model": model_name, "version": version, "weights_key": key},
    }
    return FineTuneModel(net, spec), lineage


@dataclass(frozen=True)
class Phase:
    index: int
    first_epoch: int
    end_epoch: int  # exclusive
    freeze: int
    lr: float


def plan_phases(config: TrainConfig, freeze: int, max_depth: int) -> list[Phase]:
    """One phase, or head-only (everything below the head frozen) then fine-tune at a lower LR."""
    if config.head_epochs == 0:
        return [Phase(0, 0, config.epochs, freeze, config.lr)]
    phases = [Phase(0, 0, config.head_epochs, max_depth, config.lr)]
    if config.head_epochs < config.epochs:
        lr = config.lr * config.finetune_lr_scale
        phases.append(Phase(1, config.head_epochs, config.epochs, freeze, lr))
    return phases


class OneCycle:
    """LR multiplier: linear warm-up to 1, then cosine down to ``1/final_div``. A callable object
    (not a closure) so LambdaLR's state_dict keeps it; clamped so an over-long epoch is safe."""

    def __init__(
        self, total_steps: int, pct_start: float = 0.2, div: float = 25.0, final_div: float = 1e3
    ) -> None:
        self.total_steps = max(total_steps, 1)
        self.warmup = max(int(self.total_steps * pct_start), 1)
        self.div, self.final_div = div, final_div

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return 1 / self.div + (1 - 1 / self.div) * step / self.warmup
        progress = min((step - self.warmup) / max(self.total_steps - self.warmup, 1), 1.0)
        low = 1 / self.final_div
        return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class FitResult:
    best_epoch: int
    best: EvalResult
    history: list[dict] = field(default_factory=list)
    epochs_run: int = 0
    train_seconds: float = 0.0
    images_per_second: float = 0.0
    stopped_early: bool = False


@dataclass
class _Progress:
    """Mutable loop state, checkpointed each epoch."""

    next_epoch: int = 0
    best_epoch: int = -1  # the epoch kept (see _record)
    best_accuracy: float = -1.0  # its validation accuracy
    top_accuracy: float = -1.0  # the highest validation accuracy so far
    best_state: dict | None = None
    best_eval: dict | None = None
    bad_epochs: int = 0
    stopped_early: bool = False
    history: list[dict] = field(default_factory=list)


def steps_per_epoch(dataset: StreamingDataset, batch_size: int, hw: Hardware) -> int:
    per_rank = math.ceil(dataset.num_samples / hw.world_size)
    return max(math.ceil(per_rank / batch_size), 1)


def make_loader(dataset: StreamingDataset, config: TrainConfig, hw: Hardware) -> DataLoader:
    workers = loader_workers(hw, config.workers)
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        num_workers=workers,
        pin_memory=hw.pin_memory,
        persistent_workers=False,  # set_epoch must reach the workers each epoch
        prefetch_factor=4 if workers else None,
    )


def fit(
    model: FineTuneModel,
    data: Datasets,
    config: TrainConfig,
    hw: Hardware,
    *,
    freeze: int,
    checkpoints: CheckpointStore | None = None,
    on_event: EventSink | None = None,
    cancel: CancelCheck | None = None,
) -> FitResult:
    """Train with per-epoch validation, best-epoch selection, early stopping and checkpoints;
    leaves the best epoch's weights in ``model``."""
    torch.manual_seed(config.seed)
    model.to(hw.device, memory_format=hw.memory_format())
    saved = checkpoints.load() if checkpoints is not None and config.resume else None
    progress = _restore(saved, model, data) if saved else _Progress()
    steps = steps_per_epoch(data.train, config.batch_size, hw)
    loop = _Loop(
        model=model, data=data, config=config, hw=hw, checkpoints=checkpoints,
        on_event=on_event, cancel=cancel, steps=steps,
        clock=Clock(epochs=config.epochs, batches_per_epoch=steps),
        train_loader=make_loader(data.train, config, hw),
        val_loader=make_loader(data.val, config, hw),
    )  # fmt: skip
    started = time.perf_counter()
    for phase in plan_phases(config, freeze, model.max_depth()):
        if not progress.stopped_early and phase.end_epoch > progress.next_epoch:
            _run_phase(loop, phase, progress, saved)
    model.load_state_dict(progress.best_state)
    seconds = time.perf_counter() - started
    images = sum_across_ranks(torch.tensor([float(loop.images)]), hw).item()  # the whole job's
    return FitResult(
        best_epoch=progress.best_epoch,
        best=EvalResult(**progress.best_eval),
        history=progress.history,
        epochs_run=progress.next_epoch,
        train_seconds=seconds,
        images_per_second=images / seconds if seconds else 0.0,
        stopped_early=progress.stopped_early,
    )


@dataclass
class _Loop:
    """What every epoch of one fit() needs."""

    model: FineTuneModel
    data: Datasets
    config: TrainConfig
    hw: Hardware
    checkpoints: CheckpointStore | None
    on_event: EventSink | None
    cancel: CancelCheck | None
    steps: int
    clock: Clock
    train_loader: DataLoader
    val_loader: DataLoader
    images: int = 0


def _run_phase(loop: _Loop, phase: Phase, progress: _Progress, saved: dict | None) -> None:
    config, model, hw = loop.config, loop.model, loop.hw
    model.freeze(phase.freeze)
    trained = _wrap(model, hw)
    optimizer = torch.optim.AdamW(
        model.trainable_parameters(), lr=phase.lr, weight_decay=config.weight_decay
    )
    total_steps = loop.steps * (phase.end_epoch - phase.first_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, OneCycle(total_steps))
    if saved and saved["phase"] == phase.index:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
    scaler = torch.amp.GradScaler(hw.device.type) if hw.needs_grad_scaler else None
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    for epoch in range(max(progress.next_epoch, phase.first_epoch), phase.end_epoch):
        loop.data.train.set_epoch(epoch)
        stats = train_one_epoch(
            trained, criterion, optimizer, scheduler, loop.train_loader, hw,
            epoch=epoch, clock=loop.clock, scaler=scaler, on_event=loop.on_event,
            cancel=loop.cancel, log_every=config.log_every, on_batch=loop.data.train.advance,
        )  # fmt: skip
        loop.images += stats.images
        sync_buffers(model, hw)
        class_names = loop.data.train.class_names
        result = evaluate(model, nn.CrossEntropyLoss(), loop.val_loader, hw, len(class_names))
        improved = _record(progress, epoch, stats, result, model)
        progress.next_epoch = epoch + 1
        patience = config.patience
        progress.stopped_early = (
            not improved and patience is not None and (progress.bad_epochs >= patience)
        )
        if hw.is_main and loop.checkpoints is not None:
            state = _checkpoint(progress, phase, model, optimizer, scheduler, loop.data)
            loop.checkpoints.save(state)
        _epoch_event(loop.on_event, epoch, config.epochs, stats, result, loop.clock, loop.steps)
        _update_metrics(epoch, stats, result, hw)
        if progress.stopped_early:
            return


def _wrap(model: FineTuneModel, hw: Hardware) -> nn.Module:
    # A fresh DDP per phase: DDP fixes the set of trainable parameters when it is built.
    if not hw.distributed:
        return model
    device_ids = [hw.device.index] if hw.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def within_noise(accuracy: float, top: float, images: int) -> bool:
    """True when ``accuracy`` is within one standard error of ``top`` on ``images`` val images."""
    standard_error = math.sqrt(top * (1 - top) / max(images, 1))
    return accuracy >= top - standard_error


def _record(
    progress: _Progress, epoch: int, stats: EpochStats, result: EvalResult, model: nn.Module
) -> bool:
    """Log the epoch and decide whether it becomes the kept one; True on a new top accuracy.

    The kept epoch is the latest one within one standard error of the best validation accuracy:
    on a small validation set a lower-LR later epoch that scores a little lower is noise, not
    worse, and picking the single highest score would often pick an early, undertrained epoch.
    """
    progress.history.append(
        {
            "epoch": epoch,
            "train_loss": stats.loss,
            "train_accuracy": stats.accuracy,
            "val_loss": result.loss,
            "val_accuracy": result.accuracy,
            "images_per_second": stats.images_per_second,
            "data_wait_ratio": stats.data_wait_ratio,
        }
    )
    improved = result.accuracy > progress.top_accuracy
    progress.top_accuracy = max(progress.top_accuracy, result.accuracy)
    if within_noise(result.accuracy, progress.top_accuracy, result.images):
        progress.best_epoch, progress.best_accuracy = epoch, result.accuracy
        progress.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        progress.best_eval = {
            "loss": result.loss,
            "accuracy": result.accuracy,
            "per_class_accuracy": result.per_class_accuracy,
            "confusion": result.confusion,
            "images": result.images,
        }
    progress.bad_epochs = 0 if improved else progress.bad_epochs + 1
    return improved


def _checkpoint(
    progress: _Progress,
    phase: Phase,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    data: Datasets,
) -> dict:
    return {
        "epoch": progress.next_epoch - 1,
        "phase": phase.index,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "data": data.train.state_dict(),
        "best": {
            "epoch": progress.best_epoch,
            "accuracy": progress.best_accuracy,
            "top_accuracy": progress.top_accuracy,
            "state": progress.best_state,
            "eval": progress.best_eval,
        },
        "bad_epochs": progress.bad_epochs,
        "stopped_early": progress.stopped_early,
        "history": progress.history,
    }


def _restore(saved: dict, model: nn.Module, data: Datasets) -> _Progress:
    model.load_state_dict(saved["model"])
    data.train.load_state_dict(saved["data"])
    best = saved["best"]
    return _Progress(
        next_epoch=saved["epoch"] + 1,
        best_epoch=best["epoch"],
        best_accuracy=best["accuracy"],
        top_accuracy=best["top_accuracy"],
        best_state=best["state"],
        best_eval=best["eval"],
        bad_epochs=saved["bad_epochs"],
        stopped_early=saved["stopped_early"],
        history=list(saved["history"]),
    )


def _epoch_event(
    sink: EventSink | None,
    epoch: int,
    epochs: int,
    stats: EpochStats,
    result: EvalResult,
    clock: Clock,
    steps: int,
) -> None:
    if sink is None:
        return
    sink(
        ProgressEvent(
            kind="epoch",
            epoch=epoch,
            epochs=epochs,
            batch=stats.batches,
            batches=steps,
            loss=stats.loss,
            accuracy=stats.accuracy,
            images_per_second=stats.images_per_second,
            eta_seconds=clock.eta(epoch + 1, 0),
            data_wait_ratio=stats.data_wait_ratio,
            val={"loss": result.loss, "accuracy": result.accuracy},
        )
    )


def _update_metrics(epoch: int, stats: EpochStats, result: EvalResult, hw: Hardware) -> None:
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


# --- the whole job -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainResult:
    """Everything the service needs to register the new version."""

    model: str
    version: str
    archive_key: str
    archive_digest: str
    weights_key: str
    class_names: list[str]
    metrics: dict[str, float]
    lineage: dict
    evaluation: dict  # best epoch: per-class accuracy and confusion matrix
    history: list[dict]


def preprocessing_for(config: TrainConfig) -> Preprocessing:
    return Preprocessing(resize_size=config.eval_resize, crop_size=config.crop_size)


def train_and_package(
    config: TrainConfig,
    store: ObjectStore,
    *,
    on_event: EventSink | None = None,
    cancel: CancelCheck | threading.Event | None = None,
    backbones: BackboneRegistry | None = None,
    open_data: DatasetOpener = open_datasets,
) -> TrainResult | None:
    """Train, export, package and store. Returns the result on rank 0 (None on other ranks).

    ``on_event`` receives ProgressEvents (rank 0 only); ``cancel`` (a callable or an Event) is
    checked between batches and ends the run with TrainingCancelled, keeping the last
    checkpoint, so the same call later resumes from it.
    """
    if isinstance(cancel, threading.Event):
        cancel = cancel.is_set
    hw = setup_hardware(config.device, config.channels_last)
    try:
        return _train_and_package(
            config, store, hw, on_event, cancel, backbones or BackboneRegistry(), open_data
        )
    finally:
        teardown(hw)


def _train_and_package(
    config: TrainConfig,
    store: ObjectStore,
    hw: Hardware,
    on_event: EventSink | None,
    cancel: CancelCheck | None,
    backbones: BackboneRegistry,
    open_data: DatasetOpener,
) -> TrainResult | None:
    pre = preprocessing_for(config)
    data = open_data(
        config, store, hw, train_transform(pre, config.augmentation), eval_transform(pre)
    )
    class_names = list(data.train.class_names)
    torch.manual_seed(config.seed)  # same head init on every rank
    model, origin = build_model(config, store, class_names, backbones)
    freeze = resolve_freeze(model.spec, config.freeze)
    run_id = config.run_id or f"{config.out}-{config.fingerprint(data.train.digest)}"
    store.ensure_bucket(config.bucket)
    checkpoints = CheckpointStore(store, config.bucket, run_id)
    result = fit(
        model,
        data,
        config,
        hw,
        freeze=freeze,
        checkpoints=checkpoints,
        on_event=on_event if hw.is_main else None,
        cancel=cancel,
    )
    digest = check_ranks_agree(model, hw)
    log.info("rank %d/%d: trained weights sha256 %s", hw.rank, hw.world_size, digest)
    if not hw.is_main:
        return None
    return _package(config, store, model, class_names, result, origin, freeze, data, run_id, pre)


def _package(
    config: TrainConfig,
    store: ObjectStore,
    model: FineTuneModel,
    class_names: list[str],
    fit_result: FitResult,
    origin: dict,
    freeze: int,
    data: Datasets,
    run_id: str,
    pre: Preprocessing,
) -> TrainResult:
    version = config.version or Registry(store, config.bucket).next_version(config.out)
    metrics_out = {
        "val_accuracy": fit_result.best.accuracy,
        "val_loss": fit_result.best.loss,
        "best_epoch": float(fit_result.best_epoch),
        "epochs_run": float(fit_result.epochs_run),
        "train_seconds": fit_result.train_seconds,
        "images_per_second": fit_result.images_per_second,
    }
    dataset = {
        "uri": config.dataset,
        "objects": data.train.num_objects,
        "digest": data.train.digest,
    }
    metadata = {
        "backbone": origin["backbone"],
        "frozen_depth": freeze,
        "dataset": dataset,
        "hyperparameters": config.hyperparameters(),
        "metrics": metrics_out,
        "start": origin["start"],
    }
    model.eval().cpu()
    with tempfile.TemporaryDirectory() as tmp:
        archive = build_archive(
            model,
            model_name=config.out,
            version=version,
            class_names=class_names,
            preprocessing=pre,
            metadata=metadata,
            out_dir=Path(tmp),
        )
        archive_key = Registry.archive_key(config.out, archive.digest)
        store.put_file(config.bucket, archive_key, archive.path)
    w_key = weights_key(config.out, archive.digest)
    save_weights(
        store,
        config.bucket,
        w_key,
        backbone=origin["backbone"],
        class_names=class_names,
        state_dict=model.net.state_dict(),
    )
    lineage = {
        **origin,
        "frozen_depth": freeze,
        "dataset_uri": config.dataset,
        "dataset_objects": data.train.num_objects,
        "dataset_digest": data.train.digest,
        "weights_key": w_key,
        "run_id": run_id,
        "hyperparameters": config.hyperparameters(),
    }
    evaluation = fit_result.best.as_dict(class_names)
    return TrainResult(
        model=config.out,
        version=version,
        archive_key=archive_key,
        archive_digest=archive.digest,
        weights_key=w_key,
        class_names=class_names,
        metrics=metrics_out,
        lineage=lineage,
        evaluation=evaluation,
        history=fit_result.history,
    )


# --- command line ----------------------------------------------------------------------------


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="refit fine-tuning", add_help=add_help)
    return add_arguments(parser)


def main(args: argparse.Namespace, store: ObjectStore | None = None) -> TrainResult | None:
    from trainer.progress import TqdmProgress

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = config_from_args(args)
    store = store or StorageSettings.from_env().open()
    with TqdmProgress() as progress:  # events reach rank 0 only
        result = train_and_package(config, store, on_event=progress)
    if result is not None:
        print(
            f"{result.model} v{result.version}: val_accuracy "
            f"{result.metrics['val_accuracy']:.4f} -> s3://{config.bucket}/{result.archive_key}"
        )
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
