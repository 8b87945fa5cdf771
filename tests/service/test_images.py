from __future__ import annotations

import warnings

import pytest
from PIL import Image

from refit.errors import InvalidArgument, PayloadTooLarge
from service.images import inspect_image
from tests.conftest import encode
from tests.service.test_server import huge_png

LIMITS = {"max_bytes": 1 << 20, "max_pixels": 10_000_000}


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF"])
def test_accepts_supported_formats(fmt: str) -> None:
    info = inspect_image(encode(Image.new("RGB", (40, 30), "blue"), fmt), **LIMITS)
    assert (info.format, info.width, info.height) == (fmt, 40, 30)


@pytest.mark.parametrize(
    ("data", "error", "fragment"),
    [
        (b"", InvalidArgument, "empty"),
        (b"GIF89a-not-really", InvalidArgument, "not a recognised image"),
        (bytes(2 << 20), PayloadTooLarge, "REFIT_MAX_IMAGE_BYTES"),
        (huge_png(5000, 5000), InvalidArgument, "decompression bomb"),
    ],
)
def test_rejects(data: bytes, error: type, fragment: str) -> None:
    with pytest.raises(error, match=fragment):
        inspect_image(data, **LIMITS)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_rejects_truncated(fmt: str) -> None:
    data = encode(Image.effect_noise((64, 64), 50).convert("RGB"), fmt)
    with pytest.raises(InvalidArgument, match="truncated"):
        inspect_image(data[:-100], **LIMITS)


def test_rejects_unsupported_format() -> None:
    tiff = encode(Image.new("RGB", (8, 8)), "TIFF")
    with pytest.raises(InvalidArgument, match="unsupported image format TIFF"):
        inspect_image(tiff, **LIMITS)


@pytest.mark.parametrize("size", [(1, 30_000), (30_000, 1), (21, 1)])
def test_rejects_an_aspect_ratio_the_handler_cannot_resize(size: tuple[int, int]) -> None:
    """1x30000 is under the pixel limit, but the handler scales the short side to ~256 px: a
    256x7,680,000 image would exhaust the TorchServe worker's memory."""
    with pytest.raises(InvalidArgument, match=r"pixels, an aspect ratio over 20:1; crop it"):
        inspect_image(encode(Image.new("RGB", size), "PNG"), **LIMITS)


@pytest.mark.parametrize("size", [(20, 1), (1, 20), (4000, 200)])
def test_accepts_an_aspect_ratio_up_to_the_limit(size: tuple[int, int]) -> None:
    assert inspect_image(encode(Image.new("RGB", size), "PNG"), **LIMITS).width == size[0]


def test_a_large_image_under_the_limit_raises_no_warning() -> None:
    """Past PIL's own bomb threshold (about 89 M pixels) it warns; refit's limit decides."""
    pixels = Image.MAX_IMAGE_PIXELS + 1_000_000
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        info = inspect_image(huge_png(10_000, pixels // 10_000), max_bytes=1 << 20,
                             max_pixels=2 * pixels)  # fmt: skip
    assert info.width == 10_000
