"""The default recipe: what a run leaves unset (``None`` in TrainConfig) is chosen from the
dataset's size and its images' size, the way the Fashion-MNIST runs in docs/benchmarks.md chose.
A frozen depth left to the recipe may stay None after it: the backbone's default.

- epochs: about ``IMAGES_PER_RUN`` training images seen in all, within ``EPOCH_RANGE``: a
  few-shot set gets many cheap passes, a large one at least the lower bound. With
  TrivialAugment the long runs pay off: at 10 images per class 60, 90 and 150 epochs scored
  78.1%, 79.1% and 80.3%. Without it (as colour sets train), 120 epochs did no better than 60
  there, and no worse; one rule for both keeps the recipe simple at a few minutes' cost.
- batch size: smaller under ``SMALL_SET`` images, so a tiny set still takes several steps an
  epoch.
- input size: small images are upscaled only as far as the network needs (``MIN_INPUT``, in
  steps of 32) and kept whole; images of ``FULL_INPUT`` px or more are cropped to it, as
  ImageNet's weights were trained.
- augmentation: under ``CROP_FROM_PER_CLASS`` images per class flips and no crops (random crops
  lost points there), and for grayscale images TrivialAugmentWide too (one random operation per
  image); above it, mild random resized crops and flips (TrivialAugment lost 1.6 points at 100
  per class). Colour images get no TrivialAugment: its colour operations (solarize, posterize,
  saturation) erase classes told apart by colour (a 4-colour test set fell from 0.7 or more to
  0.5), and no colour set was measured to show a gain. Under ``MIX_BELOW_PER_CLASS`` images per
  class each batch is also mixed (MixUp or CutMix, ``MIX``): on Fashion-MNIST it gained 0.9
  points at 10 images per class (higher on each of three seeds) and was neutral at 100. Larger
  sets train for few epochs, likely too few for mixing to pay off (not measured).
- frozen depth: images upscaled ``UPSCALED`` times or more train every layer. Their pixels look
  nothing like ImageNet's at the first layers' scale (blurred, often grayscale), and on
  Fashion-MNIST training all layers beat freezing 10 blocks by 0.9-1.6 points. Other images keep
  the backbone's default, which freezes the early layers (their generic features).

Surveying lists the dataset once more and downloads 5 sampled images to read their size and
mode; a packed dataset's images are not surveyed, so it gets ``FULL_INPUT`` and counts as colour.
"""

from __future__ import annotations

import io
import statistics
from dataclasses import dataclass, replace

from PIL import Image

from refit.storage import ObjectStore, S3Uri
from trainer.config import NO_FREEZE, Augmentation, TrainConfig

IMAGES_PER_RUN = 15_000
EPOCH_RANGE = (8, 150)
SMALL_SET = 500
SMALL_BATCH, BATCH = 16, 32
MIN_INPUT, FULL_INPUT = 96, 224
CROP_FROM_PER_CLASS = 50
MILD_CROP = (0.85, 1.0)
MIX_BELOW_PER_CLASS = 500
MIX = {"mixup": 0.2, "cutmix": 1.0}  # Beta alphas; each batch gets one of the two
UPSCALED = 2
SAMPLED_IMAGES = 5
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}  # PIL's single-channel modes


@dataclass(frozen=True)
class DatasetShape:
    train_images: int
    classes: int
    image_side: int | None  # median shorter side of a few sampled images; None: not surveyed
    grayscale: bool = False  # every sampled image is single-channel; False: colour or unknown

    @property
    def per_class(self) -> float:
        return self.train_images / max(self.classes, 1)


def epochs_for(shape: DatasetShape) -> int:
    low, high = EPOCH_RANGE
    return min(max(round(IMAGES_PER_RUN / max(shape.train_images, 1)), low), high)


def batch_size_for(shape: DatasetShape) -> int:
    return SMALL_BATCH if shape.train_images < SMALL_SET else BATCH


def input_size_for(shape: DatasetShape) -> tuple[int, int | None]:
    """(crop, resize): small images whole at the next multiple of 32 (at least MIN_INPUT);
    large ones resized and center-cropped to FULL_INPUT (resize None: torchvision's ratio)."""
    side = shape.image_side
    if side is None or side >= FULL_INPUT:
        return FULL_INPUT, None
    crop = max(MIN_INPUT, -(-side // 32) * 32)
    return crop, crop


def augmentation_for(shape: DatasetShape) -> Augmentation:
    few = shape.per_class < CROP_FROM_PER_CLASS
    mix = MIX if shape.per_class < MIX_BELOW_PER_CLASS else {}
    return Augmentation(
        crop_scale=(1.0, 1.0) if few else MILD_CROP,
        trivial_augment=few and shape.grayscale,
        **mix,
    )


def freeze_for(shape: DatasetShape, crop_size: int) -> int | None:
    """Nothing frozen for much upscaled images; otherwise None: the backbone's default."""
    side = shape.image_side
    return NO_FREEZE if side is not None and side * UPSCALED <= crop_size else None


def complete(config: TrainConfig, shape: DatasetShape) -> TrainConfig:
    """``config`` with every field it leaves to the recipe filled in from ``shape``."""
    crop, resize = input_size_for(shape)
    chosen_input = config.crop_size is None
    crop_size = crop if chosen_input else config.crop_size
    return replace(
        config,
        freeze=freeze_for(shape, crop_size) if config.freeze is None else config.freeze,
        epochs=config.epochs or max(epochs_for(shape), config.head_epochs),
        batch_size=config.batch_size or batch_size_for(shape),
        crop_size=crop_size,
        resize_size=resize if chosen_input and config.resize_size is None else config.resize_size,
        augmentation=config.augmentation or augmentation_for(shape),
    )


def survey(config: TrainConfig, store: ObjectStore) -> DatasetShape:
    """The training split's size and its images' size and mode, read the way open_dataset
    reads them."""
    from trainer.data.layout import build_listing, list_objects, normalize_prefix
    from trainer.data.open import read_index
    from trainer.data.retry import RetryPolicy

    prefix = normalize_prefix(S3Uri.parse(config.dataset))
    retry = RetryPolicy()
    index = read_index(store, prefix, retry)
    if index is not None:
        return DatasetShape(index.count("train"), len(index.class_names), None)
    listing = build_listing(prefix, list_objects(store, prefix, retry), config.val_fraction)
    train = listing.splits["train"]
    step = max(len(train) // SAMPLED_IMAGES, 1)
    samples = [_sample(store, prefix.bucket, s.key) for s in train[::step][:SAMPLED_IMAGES]]
    known = [sample for sample in samples if sample is not None]
    side = int(statistics.median(s for s, _ in known)) if known else None
    grayscale = bool(known) and all(gray for _, gray in known)
    return DatasetShape(len(train), len(listing.class_names), side, grayscale)


def _sample(store: ObjectStore, bucket: str, key: str) -> tuple[int, bool] | None:
    """(shorter side, grayscale) from the image's header; None when it cannot be read
    (training reports bad images)."""
    try:
        with Image.open(io.BytesIO(store.get(bucket, key))) as image:
            return min(image.size), image.mode in GRAY_MODES
    except Exception:
        return None
