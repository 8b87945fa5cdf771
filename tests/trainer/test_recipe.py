"""The default recipe: what a run leaves unset, chosen from the dataset."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from refit.storage import FileStore
from trainer import recipe
from trainer.config import NO_FREEZE, Augmentation, TrainConfig
from trainer.recipe import DatasetShape


def _config(**fields) -> TrainConfig:
    return TrainConfig(dataset="s3://data/set", out="m", **fields)


@pytest.mark.parametrize(
    ("train_images", "epochs", "batch_size"),
    [(100, 150, 16), (300, 50, 16), (1_000, 15, 32), (5_000, 8, 32), (1_000_000, 8, 32)],
)
def test_smaller_sets_get_more_epochs_and_smaller_batches(
    train_images: int, epochs: int, batch_size: int
) -> None:
    shape = DatasetShape(train_images, classes=10, image_side=28)
    assert recipe.epochs_for(shape) == epochs
    assert recipe.batch_size_for(shape) == batch_size


@pytest.mark.parametrize(
    ("side", "crop", "resize"),
    [(28, 96, 96), (96, 96, 96), (100, 128, 128), (150, 160, 160), (224, 224, None),
     (1_024, 224, None), (None, 224, None)],
)  # fmt: skip
def test_small_images_are_kept_whole_and_large_ones_cropped_to_imagenets_size(
    side: int | None, crop: int, resize: int | None
) -> None:
    assert recipe.input_size_for(DatasetShape(1_000, 10, side)) == (crop, resize)


def test_few_shot_sets_get_no_crops_and_larger_ones_mild_crops() -> None:
    few = recipe.augmentation_for(DatasetShape(100, 10, 28, grayscale=True))
    assert few.crop_scale == (1.0, 1.0) and few.trivial_augment
    larger = recipe.augmentation_for(DatasetShape(1_000, 10, 28, grayscale=True))
    assert larger.crop_scale == (0.85, 1.0) and not larger.trivial_augment


def test_trivial_augment_only_for_grayscale_images_whose_colour_it_cannot_erase() -> None:
    colour = recipe.augmentation_for(DatasetShape(100, 10, 28, grayscale=False))
    assert colour.crop_scale == (1.0, 1.0) and not colour.trivial_augment


def test_batches_are_mixed_under_500_images_per_class() -> None:
    for per_class in (10, 100, 499):
        mixed = recipe.augmentation_for(DatasetShape(per_class * 10, 10, 28))
        assert (mixed.mixup, mixed.cutmix) == (0.2, 1.0)
    plain = recipe.augmentation_for(DatasetShape(5_000, 10, 28))
    assert (plain.mixup, plain.cutmix) == (0.0, 0.0)


def test_complete_fills_only_what_the_config_leaves_unset() -> None:
    shape = DatasetShape(100, 10, 28, grayscale=True)
    filled = recipe.complete(_config(freeze=3), shape)
    assert filled.complete
    assert (filled.epochs, filled.batch_size, filled.crop_size, filled.eval_resize) == (
        150, 16, 96, 96,
    )  # fmt: skip
    assert filled.augmentation == Augmentation(
        crop_scale=(1.0, 1.0), mixup=0.2, cutmix=1.0, trivial_augment=True
    )
    mine = Augmentation(rotation=10)
    chosen = _config(freeze=3, epochs=3, batch_size=8, crop_size=64, augmentation=mine)
    assert recipe.complete(chosen, shape) == chosen
    # The user's input size keeps torchvision's resize ratio unless they set the resize too.
    assert recipe.complete(_config(crop_size=160), shape).eval_resize == round(160 / 0.875)


def test_much_upscaled_images_train_every_layer_and_others_keep_the_backbones_default() -> None:
    assert recipe.complete(_config(), DatasetShape(1_000, 10, 28)).freeze == NO_FREEZE  # 96 px
    assert recipe.complete(_config(), DatasetShape(1_000, 10, 150)).freeze is None  # 160 px
    assert recipe.complete(_config(), DatasetShape(1_000, 10, 500)).freeze is None
    assert recipe.complete(_config(crop_size=64), DatasetShape(1_000, 10, 28)).freeze == NO_FREEZE
    assert recipe.complete(_config(freeze=10), DatasetShape(1_000, 10, 28)).freeze == 10


def test_head_epochs_are_never_more_than_the_recipes_epochs() -> None:
    filled = recipe.complete(_config(head_epochs=12), DatasetShape(100_000, 10, 300))
    assert filled.epochs == 12


def _png(side: tuple[int, int], mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, side, (120, 30, 200) if mode == "RGB" else 120).save(buffer, format="PNG")
    return buffer.getvalue()


def test_survey_counts_the_training_split_and_reads_the_images_size(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    store.ensure_bucket("data")
    for cls in ("cat", "dog", "fox"):
        for i in range(4):
            store.put("data", f"set/train/{cls}/{i}.png", _png((40, 28)))
        store.put("data", f"set/val/{cls}/0.png", _png((40, 28)))
    store.put("data", "set/train/cat/broken.png", b"not an image")
    shape = recipe.survey(_config(), store)
    assert shape == DatasetShape(train_images=13, classes=3, image_side=28, grayscale=False)
    assert recipe.complete(_config(), shape).crop_size == 96


@pytest.mark.parametrize(
    ("modes", "grayscale"), [(["L"] * 4, True), (["L", "L", "RGB", "L"], False)]
)
def test_survey_finds_grayscale_only_when_every_sampled_image_is(
    tmp_path: Path, modes: list[str], grayscale: bool
) -> None:
    store = FileStore(tmp_path)
    store.ensure_bucket("data")
    for i, mode in enumerate(modes):
        store.put("data", f"set/train/cat/{i}.png", _png((28, 28), mode))
        store.put("data", f"set/train/dog/{i}.png", _png((28, 28), "L"))
    assert recipe.survey(_config(), store).grayscale is grayscale
