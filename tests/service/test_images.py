from __future__ import annotations

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
