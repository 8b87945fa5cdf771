"""Training augmentations and the evaluation pipeline that mirrors the serving handler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from trainer.config import Augmentation
from trainer.preprocessing import Preprocessing
from trainer.transforms import eval_transform, train_transform

PRE = Preprocessing(resize_size=40, crop_size=32)


def _image(mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).convert(mode)


def test_eval_transform_is_the_handlers_pipeline() -> None:
    # trainer/serving/handler.py: RGB decode, Resize, CenterCrop, ToDtype(scale), Normalize.
    handler = v2.Compose([v2.ToImage(), v2.Resize(PRE.resize_size, antialias=True),
                          v2.CenterCrop(PRE.crop_size), v2.ToDtype(torch.float32, scale=True),
                          v2.Normalize(PRE.mean, PRE.std)])  # fmt: skip
    image = _image()
    assert torch.equal(eval_transform(PRE)(image), handler(image))


def test_grayscale_images_become_three_channels_like_in_serving() -> None:
    out = eval_transform(PRE)(_image("L"))
    assert out.shape == (3, 32, 32)
    assert torch.equal(out, eval_transform(PRE)(_image("L").convert("RGB")))


def test_augmentations_are_random_and_sized_to_the_crop() -> None:
    aug = Augmentation(
        crop_scale=(0.3, 1.0), hflip=0.5, rotation=15, translate=0.1, color_jitter=0.3
    )
    transform = train_transform(PRE, aug)
    torch.manual_seed(0)
    first, second = transform(_image()), transform(_image())
    assert first.shape == second.shape == (3, 32, 32) and first.dtype == torch.float32
    assert not torch.equal(first, second)


def test_translation_shifts_content_within_the_bound() -> None:
    image = Image.new("L", (32, 32))
    image.paste(255, (12, 12, 20, 20))  # an 8x8 white square in the middle
    transform = train_transform(PRE, Augmentation(crop_scale=(1.0, 1.0), hflip=0.0, translate=0.1))
    torch.manual_seed(0)
    centres = set()
    for _ in range(20):
        bright = (transform(image)[0] > 0).nonzero().float().mean(0)
        centres.add(tuple(bright.round().tolist()))
        assert (bright - 15.5).abs().max() <= 0.1 * 32 + 1  # within the shift bound
    assert len(centres) > 1


def test_no_augmentation_equals_evaluation() -> None:
    transform = train_transform(PRE, Augmentation(crop_scale=(1.0, 1.0), hflip=0.0))
    assert torch.equal(transform(_image()), eval_transform(PRE)(_image()))


@pytest.mark.parametrize(
    "bad",
    [{"crop_scale": (0.0, 1.0)}, {"crop_scale": (0.9, 0.5)}, {"hflip": 1.5}, {"translate": 1.0}],
)
def test_invalid_augmentation_is_rejected(bad: dict) -> None:
    with pytest.raises(ValueError):
        Augmentation(**bad)
