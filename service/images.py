"""Cheap checks on image bytes before they go upstream: header only, no full decode.

TorchServe's handler does the full decode and reports anything these checks cannot see.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from refit.errors import InvalidArgument, PayloadTooLarge

FORMATS = {"JPEG", "PNG", "WEBP", "BMP", "GIF"}
# The handler scales the short side to the model's resize size (~256 px) before its centre crop,
# so a thin image under the pixel limit (1x30000) would become 256x7,680,000 in the TorchServe
# worker. The handler refuses the same (trainer/serving/handler.py); past 20:1 its centre crop
# shows the model under 5% of the image anyway.
MAX_ASPECT_RATIO = 20
_JPEG_END = b"\xff\xd9"
_PNG_END = b"IEND\xaeB`\x82"


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int


def inspect_image(data: bytes, *, max_bytes: int, max_pixels: int) -> ImageInfo:
    if not data:
        raise InvalidArgument(
            "image is empty: send the bytes of a JPEG, PNG, WebP, BMP or GIF file"
        )
    if len(data) > max_bytes:
        raise PayloadTooLarge(
            f"image is {len(data)} bytes; the limit is {max_bytes} (REFIT_MAX_IMAGE_BYTES)"
        )
    info = _read_header(data, max_pixels)
    if info.width * info.height > max_pixels:
        raise InvalidArgument(
            f"image is {info.width}x{info.height} pixels, over the limit of {max_pixels} "
            "(REFIT_MAX_IMAGE_PIXELS); rejected as a possible decompression bomb"
        )
    if max(info.width, info.height) > MAX_ASPECT_RATIO * min(info.width, info.height):
        raise InvalidArgument(
            f"image is {info.width}x{info.height} pixels, an aspect ratio over "
            f"{MAX_ASPECT_RATIO}:1; crop it to the part to classify (the model sees only the "
            "centre square)"
        )
    if _looks_truncated(info.format, data):
        raise InvalidArgument(f"{info.format} image is truncated: its end marker is missing")
    return info


def _read_header(data: bytes, max_pixels: int) -> ImageInfo:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                fmt, (width, height) = image.format or "", image.size
    except Image.DecompressionBombError as exc:
        raise InvalidArgument(f"rejected as a decompression bomb: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InvalidArgument(
            "bytes are not a recognised image; send a JPEG, PNG, WebP, BMP or GIF file"
        ) from exc
    if fmt not in FORMATS:
        raise InvalidArgument(f"unsupported image format {fmt}; use one of {sorted(FORMATS)}")
    return ImageInfo(fmt, width, height)


def _looks_truncated(fmt: str, data: bytes) -> bool:
    tail = data[-64:]
    if fmt == "JPEG":
        return _JPEG_END not in tail
    if fmt == "PNG":
        return _PNG_END not in tail
    return False
