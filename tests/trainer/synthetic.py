"""Generated colour-class images for fine-tuning tests: class = dominant colour of a shape on a
noisy background, so a pretrained backbone learns it in a few steps but not without training."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import IterableDataset

from refit.storage import ObjectStore

COLOURS = {
    "blue": (40, 60, 220),
    "green": (40, 190, 60),
    "red": (220, 40, 40),
    "yellow": (230, 220, 40),
}
CLASS_NAMES = sorted(COLOURS)


def colour_image(label: int, rng: np.random.Generator, size: int = 48) -> Image.Image:
    background = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    image = Image.fromarray((background // 3 + 60).astype(np.uint8))
    low, high = rng.integers(0, size // 4, 2), rng.integers(3 * size // 4, size, 2)
    shape = [int(low[0]), int(low[1]), int(high[0]), int(high[1])]
    draw = ImageDraw.Draw(image)
    fill = COLOURS[CLASS_NAMES[label]]
    if rng.random() < 0.5:
        draw.ellipse(shape, fill=fill)
    else:
        draw.rectangle(shape, fill=fill)
    return image


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


class ColourDataset(IterableDataset):
    """In memory, the shape of trainer.data's datasets (class_names, set_epoch, state_dict...)."""

    def __init__(self, n: int, transform, seed: int, size: int = 48) -> None:
        super().__init__()
        self.n, self.transform, self.seed, self.size = n, transform, seed, size
        self.class_names = list(CLASS_NAMES)
        self.num_samples = self.num_objects = n
        self.digest = f"colours-{n}-{seed}"
        self.epoch = self.seen = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.seen = epoch, 0

    def advance(self, n: int) -> None:
        self.seen += n

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.seen = state["epoch"], state["seen"]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        for i in range(self.n):
            label = i % len(CLASS_NAMES)
            yield self.transform(colour_image(label, rng, self.size)), label


def upload_colours(
    store: ObjectStore, bucket: str, prefix: str, *, train: int, val: int, size: int = 48
) -> str:
    """``train``/``val`` images per class as PREFIX/{train,val}/<class>/<n>.png; returns the URI."""
    store.ensure_bucket(bucket)
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for label, name in enumerate(CLASS_NAMES):
            for n in range(count):
                data = png_bytes(colour_image(label, rng, size))
                store.put(bucket, f"{prefix}/{split}/{name}/{n:04d}.png", data)
    return f"s3://{bucket}/{prefix}"
