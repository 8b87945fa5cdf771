"""A small fine-tuning setup on in-memory colour images, shared by the loop's tests."""

from __future__ import annotations

from dataclasses import replace

import torch

from tests.trainer.synthetic import CLASS_NAMES, ColourDataset
from trainer.backbones import BackboneRegistry
from trainer.config import Augmentation, TrainConfig
from trainer.datasets import Datasets
from trainer.engine import EvalResult
from trainer.finetune import FineTuneModel
from trainer.hardware import Hardware
from trainer.preprocessing import Preprocessing
from trainer.selection import EpochSelection
from trainer.starting_point import build_model
from trainer.transforms import eval_transform, train_transform

CPU = Hardware(device=torch.device("cpu"), amp_dtype=None, channels_last=False)
SIZE = 48


def small_config(**changes: object) -> TrainConfig:
    base = TrainConfig(
        dataset="s3://mem/colours",
        out="colours",
        epochs=4,
        batch_size=16,
        crop_size=SIZE,
        augmentation=Augmentation(),
        workers=0,
        lr=3e-3,
        log_every=1,
    )
    return replace(base, **changes)


def colour_data(config: TrainConfig, train: int = 96, val: int = 32) -> Datasets:
    pre = Preprocessing.for_config(config)
    return Datasets(
        ColourDataset(train, train_transform(pre, config.augmentation), seed=1),
        ColourDataset(val, eval_transform(pre), seed=2),
    )


def colour_model(config: TrainConfig) -> FineTuneModel:
    torch.manual_seed(0)
    model, _ = build_model(config, None, list(CLASS_NAMES), BackboneRegistry())
    return model


def kept_epoch(accuracies: list[float], images: int) -> int:
    """The epoch an EpochSelection keeps after validation accuracies ``accuracies``."""
    selection, model = EpochSelection(), torch.nn.Linear(1, 1)
    for epoch, accuracy in enumerate(accuracies):
        result = EvalResult(loss=0.0, accuracy=accuracy, per_class_accuracy=[], confusion=[],
                            images=images)  # fmt: skip
        selection.record(epoch, result, model)
    return selection.epoch
