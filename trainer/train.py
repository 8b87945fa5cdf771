"""Fine-tune a backbone on a streamed dataset, then export, package and store the result.

Shaped like torchvision's references/classification/train.py: ``get_args_parser()`` and
``main(args)`` here; ``train_and_package(config, store)`` is the one call a job runner needs. The
pieces, one job each: ``datasets`` (what a run reads), ``starting_point`` (the model it starts
from), ``schedule`` (phases, optimizer, one-cycle LR), ``loop`` (the epochs, resuming from
``checkpoint``), ``engine`` (``train_one_epoch``, ``evaluate``), ``selection`` (the epoch kept),
``reporting`` (events, metrics), ``artifacts`` (archive, weights and the result's lineage).

Single process:   python -m trainer.train --dataset s3://data/flowers --out flowers
Several GPUs/CPUs: torchrun --nproc-per-node 2 -m trainer.train --dataset ... --out ...
"""

from __future__ import annotations

import argparse
import logging
import threading
from dataclasses import replace

import torch

from refit.storage import ObjectStore, StorageSettings
from trainer import recipe
from trainer.artifacts import TrainedModel, TrainResult, store_artifacts
from trainer.backbones import BackboneRegistry
from trainer.checkpoint import CheckpointStore
from trainer.config import TrainConfig, add_arguments, config_from_args
from trainer.datasets import DatasetOpener, open_datasets
from trainer.engine import CancelCheck, EventSink
from trainer.finetune import resolve_freeze
from trainer.hardware import Hardware, check_ranks_agree, setup_hardware, teardown
from trainer.loop import fit
from trainer.preprocessing import Preprocessing
from trainer.starting_point import build_model
from trainer.transforms import eval_transform, train_transform

log = logging.getLogger(__name__)


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
    What ``config`` leaves unset is the default recipe's for the dataset (trainer/recipe.py).

    ``on_event`` receives ProgressEvents (rank 0 only); ``cancel`` (a callable or an Event) is
    checked between batches and ends the run with TrainingCancelled, keeping the last
    checkpoint, so the same call later resumes from it.
    """
    if isinstance(cancel, threading.Event):
        cancel = cancel.is_set
    if not config.complete:
        config = recipe.complete(config, recipe.survey(config, store))
        log.info("recipe for %s: %s", config.dataset, config.hyperparameters())
    hw = setup_hardware(config.device, config.channels_last)
    try:
        trained = _train(config, store, hw, on_event, cancel, backbones or BackboneRegistry(),
                         open_data)  # fmt: skip
        return store_artifacts(trained, config, store) if trained is not None else None
    finally:
        teardown(hw)


def _train(
    config: TrainConfig,
    store: ObjectStore,
    hw: Hardware,
    on_event: EventSink | None,
    cancel: CancelCheck | None,
    backbones: BackboneRegistry,
    open_data: DatasetOpener,
) -> TrainedModel | None:
    """The fitted model on rank 0 (None on the others, once every rank agrees on the weights)."""
    pre = Preprocessing.for_config(config)
    data = open_data(
        config, store, hw, train_transform(pre, config.augmentation), eval_transform(pre)
    )
    class_names = list(data.train.class_names)
    torch.manual_seed(config.seed)  # same head init on every rank
    model, origin = build_model(config, store, class_names, backbones)
    freeze = resolve_freeze(model.spec, config.freeze)
    run_id = config.run_id or f"{config.out}-{config.fingerprint(data.train.digest)}"
    store.ensure_bucket(config.bucket)
    result = fit(
        model, data, config, hw, freeze=freeze,
        checkpoints=CheckpointStore(store, config.bucket, run_id),
        on_event=on_event if hw.is_main else None, cancel=cancel,
    )  # fmt: skip
    digest = check_ranks_agree(model, hw)
    log.info("rank %d/%d: trained weights sha256 %s", hw.rank, hw.world_size, digest)
    if not hw.is_main:
        return None
    lineage = replace(
        origin,
        frozen_depth=freeze,
        dataset_uri=config.dataset,
        dataset_objects=data.train.num_objects,
        dataset_digest=data.train.digest,
        run_id=run_id,
        hyperparameters=config.hyperparameters(),
    )
    # This rank alone reads both splits whole, through the evaluation transform (serving_model.py)
    single = replace(hw, rank=0, world_size=1)
    checks = open_data(config, store, single, eval_transform(pre), eval_transform(pre))
    return TrainedModel(model, class_names, result, lineage, pre, checks)


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
