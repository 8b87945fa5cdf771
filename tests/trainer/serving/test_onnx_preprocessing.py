"""The ONNX handler's preprocessing (Pillow and numpy) against training's evaluation transform
(torchvision): what validation scored is what is served, to a stated tolerance.

Tolerances, in normalized units (a difference of one 8-bit level is 1 / 255 / std):
- full decode: every value within ONE_LEVEL (Pillow's and torch's antialiased bilinear resizes
  round a few pixels differently), the mean difference under MEAN_FULL;
- JPEGs decoded in draft mode (DCT scaling, images at least twice the resize size) against the
  torchvision path on the full decode: the mean difference under MEAN_DRAFT (about three 8-bit
  levels; edges differ most). Its effect on predictions is in docs/benchmarks.md."""

from __future__ import annotations

import functools
import io

import numpy as np
import pytest
from PIL import Image

from trainer.preprocessing import Preprocessing
from trainer.serving.onnx_handler import decode, resize_and_crop
from trainer.transforms import eval_transform

ONE_LEVEL = 1 / 255 / min(Preprocessing().std) + 1e-6
MEAN_FULL = 2e-3
MEAN_DRAFT = 0.06
MODES = ("RGB", "L", "RGBA", "P", "LA", "CMYK")
SIZES = [(1, 1), (2, 3), (5, 5), (31, 17), (20, 400), (400, 20), (333, 517), (517, 333),
         (224, 224), (256, 256), (255, 257), (640, 480), (1200, 900)]  # fmt: skip


def served(data: bytes, pre: Preprocessing) -> np.ndarray:
    pixels = resize_and_crop(decode(data, pre.resize_size), pre.resize_size, pre.crop_size)
    mean = np.asarray(pre.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(pre.std, dtype=np.float32).reshape(3, 1, 1)
    return (pixels.transpose(2, 0, 1).astype(np.float32) / 255 - mean) / std


def validated(data: bytes, pre: Preprocessing) -> np.ndarray:
    return eval_transform(pre)(Image.open(io.BytesIO(data))).numpy()


@functools.cache
def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """Smooth shapes and some noise: resampling differences show as in photos."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [
        128 + 100 * np.sin(x / (3 + 40 * rng.random()) + y / (3 + 40 * rng.random()) + c)
        for c in range(3)
    ]
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def encoded(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, quality=92) if fmt == "JPEG" else image.save(out, fmt)
    return out.getvalue()


@pytest.mark.parametrize(("resize", "crop"), [(256, 224), (40, 32), (24, 32), (41, 33)])
def test_full_decode_matches_the_eval_transform_on_many_shapes(resize: int, crop: int) -> None:
    pre = Preprocessing(resize_size=resize, crop_size=crop)
    rng = np.random.default_rng(0)
    for width, height in SIZES:
        for mode in MODES:
            if mode == "CMYK":
                fmt = "JPEG"
            else:
                fmt = "PNG" if rng.random() < 0.5 or mode != "RGB" else "WEBP"
            image = photo_like(width, height, int(rng.integers(4))).convert(mode)
            data = encoded(image, fmt)
            if fmt == "JPEG" and min(width, height) >= 2 * resize:
                continue  # draft-decoded: the next test
            diff = np.abs(served(data, pre) - validated(data, pre))
            assert diff.max() <= ONE_LEVEL, (width, height, mode, fmt, diff.max())
            assert diff.mean() <= MEAN_FULL, (width, height, mode, fmt, diff.mean())


@pytest.mark.parametrize("size", [(512, 512), (1024, 700), (700, 1800), (2400, 1600)])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_draft_decoded_jpegs_stay_close_to_the_full_decode(size: tuple, mode: str) -> None:
    pre = Preprocessing()
    data = encoded(photo_like(*size, seed=sum(size)).convert(mode), "JPEG")
    decoded = decode(data, pre.resize_size)
    assert min(decoded.size) < min(size) and min(decoded.size) >= pre.resize_size  # scaled
    diff = np.abs(served(data, pre) - validated(data, pre))
    assert diff.mean() <= MEAN_DRAFT, (size, mode, diff.mean())


def test_draft_mode_is_used_only_from_twice_the_resize_size() -> None:
    pre = Preprocessing()
    below = encoded(photo_like(700, 511, 1), "JPEG")
    assert decode(below, pre.resize_size).size == (700, 511)
    at = encoded(photo_like(700, 512, 1), "JPEG")
    assert decode(at, pre.resize_size).size == (350, 256)
    png = encoded(photo_like(1200, 1200, 1), "PNG")  # no DCT to scale: decoded whole
    assert decode(png, pre.resize_size).size == (1200, 1200)
