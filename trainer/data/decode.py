"""Image decoding with a pixel limit, and the budget of bad images a run may skip."""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass

from PIL import Image

from trainer import metrics
from trainer.data.errors import TooManyBadImages

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeOptions:
    # Checked from the header before any pixel is decoded (decompression bombs). Like PIL's
    # MAX_IMAGE_PIXELS, but per dataset instead of a process-wide global.
    max_pixels: int = 64_000_000

    def __post_init__(self) -> None:
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be positive, got {self.max_pixels}")


class BadImage(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason  # "undecodable" | "too_large": a bounded metric label
        self.detail = detail


def decode_image(data: bytes, options: DecodeOptions) -> Image.Image:
    """Decode fully to RGB (so truncated files fail here, not later in a transform)."""
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > options.max_pixels:
            raise BadImage("too_large", f"{width}x{height} exceeds {options.max_pixels} pixels")
        image.load()
        return image.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise BadImage("too_large", str(exc)) from exc
    except Image.UnidentifiedImageError as exc:
        raise BadImage("undecodable", "not a recognised image format") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's ways of saying "not an image"
        raise BadImage("undecodable", f"{type(exc).__name__}: {exc}") from exc


class BadImageBudget:
    """Skips and counts bad images; fails once they exceed ``max_fraction`` of ``total``.

    The allowance is fixed up front from the number of images this reader will see, so the
    outcome does not depend on where in the epoch the bad images happen to fall.
    """

    def __init__(self, total: int, max_fraction: float) -> None:
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_fraction}")
        self.total = total
        self.allowed = math.floor(max_fraction * total)
        self.max_fraction = max_fraction
        self.bad = 0

    def record(self, key: str, error: BadImage) -> None:
        self.bad += 1
        metrics.DATASET_BAD_IMAGES.labels(error.reason).inc()
        log.warning("skipping bad image %s (%s)", key, error)
        if self.bad > self.allowed:
            raise TooManyBadImages(
                f"{self.bad} of {self.total} images are bad (allowed fraction "
                f"{self.max_fraction:g}); last one: {key} ({error})"
            )
