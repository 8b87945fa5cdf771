"""Image transforms. Evaluation mirrors the serving handlers (same Preprocessing), so the
accuracy measured at validation is the accuracy served."""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torchvision.transforms import v2

from trainer.config import Augmentation
from trainer.preprocessing import Preprocessing

__all__ = ["Augmentation", "batch_mix", "eval_transform", "train_transform"]

Transform = Callable[[Image.Image], torch.Tensor]
BatchMix = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def to_rgb(image: Image.Image) -> Image.Image:
    # The handler converts every image to RGB; grayscale datasets must look the same in training.
    return image if image.mode == "RGB" else image.convert("RGB")


def train_transform(pre: Preprocessing, aug: Augmentation) -> Transform:
    steps: list = [v2.Lambda(to_rgb), v2.ToImage()]
    if aug.crop_scale == (1.0, 1.0):
        steps += [v2.Resize(pre.resize_size, antialias=True), v2.CenterCrop(pre.crop_size)]
    else:
        steps.append(v2.RandomResizedCrop(pre.crop_size, scale=aug.crop_scale, antialias=True))
    if aug.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(aug.hflip))
    if aug.rotation > 0 or aug.translate > 0:
        steps.append(v2.RandomAffine(aug.rotation, translate=(aug.translate, aug.translate)))
    if aug.color_jitter > 0:
        j = aug.color_jitter
        steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j))
    if aug.trivial_augment:
        steps.append(v2.TrivialAugmentWide())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(pre.mean, pre.std)]
    if aug.erasing > 0:
        steps.append(v2.RandomErasing(aug.erasing))
    return v2.Compose(steps)


def batch_mix(aug: Augmentation, classes: int) -> BatchMix | None:
    """MixUp and/or CutMix over a batch: (images, labels) -> (mixed images, soft targets)."""
    mixes = [
        mix(alpha=alpha, num_classes=classes)
        for mix, alpha in ((v2.MixUp, aug.mixup), (v2.CutMix, aug.cutmix))
        if alpha > 0
    ]
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)


def eval_transform(pre: Preprocessing) -> Transform:
    """What the serving handlers compute: the ONNX handler (trainer/serving/onnx_handler.py,
    Pillow and numpy) within one 8-bit level (tests/trainer/serving/test_onnx_preprocessing.py),
    the TorchScript one (trainer/serving/handler.py, torch alone) to the bit
    (tests/trainer/test_transforms.py)."""
    return v2.Compose(
        [
            v2.Lambda(to_rgb),
            v2.ToImage(),
            v2.Resize(pre.resize_size, antialias=True),
            v2.CenterCrop(pre.crop_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(pre.mean, pre.std),
        ]
    )
