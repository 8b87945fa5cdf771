"""Training augmentations and the evaluation pipeline that mirrors the serving handler."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.config import Augmentation
from trainer.preprocessing import Preprocessing
from trainer.serving.handler import transform_for
from trainer.transforms import batch_mix, eval_transform, train_transform

PRE = Preprocessing(resize_size=40, crop_size=32)


def _image(mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).convert(mode)


SIZES = [(70, 50), (50, 70), (32, 32), (40, 40), (20, 12), (12, 20), (33, 97), (301, 7), (5, 5)]


@pytest.mark.parametrize("capability", ["native", "DEFAULT"])  # uint8 resize, or via float
@pytest.mark.parametrize(("resize", "crop"), [(40, 32), (32, 32), (96, 96), (24, 32), (41, 33)])
def test_eval_transform_is_the_handlers_pipeline_to_the_bit(
    resize: int, crop: int, capability: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The handler preprocesses without torchvision (a worker's memory): what it serves must be
    what validation scored, for any image size, upscaled or cropped, on any CPU."""
    if capability != "native":
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    pre = Preprocessing(resize_size=resize, crop_size=crop)
    served = transform_for(asdict(pre))
    rng = np.random.default_rng(0)
    for width, height in SIZES:
        for mode in ("RGB", "L"):
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            image = Image.fromarray(pixels).convert(mode)
            expected = eval_transform(pre)(image)
            assert torch.equal(served(image.convert("RGB")), expected), (width, height, mode)


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


def test_erasing_blanks_one_rectangle_after_normalization() -> None:
    plain = Augmentation(crop_scale=(1.0, 1.0), hflip=0.0)
    erased = train_transform(PRE, Augmentation(crop_scale=(1.0, 1.0), hflip=0.0, erasing=1.0))
    torch.manual_seed(0)
    out, reference = erased(_image()), train_transform(PRE, plain)(_image())
    changed = (out != reference).any(0).nonzero()
    assert len(changed) > 0 and bool((out[:, changed[:, 0], changed[:, 1]] == 0).all())
    rows, cols = changed[:, 0], changed[:, 1]
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert box == len(changed)  # one filled rectangle


def test_trivial_augment_varies_images_and_keeps_their_shape() -> None:
    transform = train_transform(
        PRE, Augmentation(crop_scale=(1.0, 1.0), hflip=0.0, trivial_augment=True)
    )
    reference = eval_transform(PRE)(_image())
    torch.manual_seed(0)
    outputs = [transform(_image()) for _ in range(10)]
    assert all(o.shape == (3, 32, 32) and o.dtype == torch.float32 for o in outputs)
    assert sum(not torch.equal(o, reference) for o in outputs) >= 5


@pytest.mark.parametrize(
    "bad",
    [
        {"crop_scale": (0.0, 1.0)},
        {"crop_scale": (0.9, 0.5)},
        {"hflip": 1.5},
        {"translate": 1.0},
        {"mixup": -0.1},
        {"cutmix": -1.0},
        {"erasing": 1.5},
    ],
)
def test_invalid_augmentation_is_rejected(bad: dict) -> None:
    with pytest.raises(ValueError):
        Augmentation(**bad)


def test_no_batch_mix_unless_asked() -> None:
    assert batch_mix(Augmentation(), classes=4) is None


def test_mixup_blends_each_image_with_another_and_softens_its_target() -> None:
    torch.manual_seed(0)
    images = torch.stack([torch.full((3, 8, 8), float(i)) for i in range(4)])
    labels = torch.tensor([0, 1, 2, 3])
    mixed, targets = batch_mix(Augmentation(mixup=1.0), classes=4)(images, labels)
    assert targets.shape == (4, 4) and torch.allclose(targets.sum(1), torch.ones(4))
    for image, target in zip(mixed, targets, strict=True):
        # each pixel is the two source images' values weighted by the target's two shares
        assert torch.allclose(image, (target * torch.arange(4.0)).sum().expand_as(image))
        assert (target > 0).sum() == 2


def test_cutmix_pastes_a_patch_and_shares_the_target_by_area() -> None:
    torch.manual_seed(0)
    images = torch.stack([torch.full((3, 8, 8), float(i)) for i in range(4)])
    mixed, targets = batch_mix(Augmentation(cutmix=1.0), classes=4)(images, torch.arange(4))
    for i, (image, target) in enumerate(zip(mixed, targets, strict=True)):
        own_share = (image == i).float().mean()
        assert torch.isclose(target[i], own_share)
