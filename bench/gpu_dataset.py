"""bench/gpu_check.py's data: an S3 server (moto, as the tests use) and a generated image
dataset on it, the class being the colour of a shape on a noisy background."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

from refit.netutil import free_port
from refit.storage import ObjectStore, StorageSettings

if TYPE_CHECKING:
    from gpu_check import Sizes

BUCKET = "gpucheck"
COLOURS = [
    (220, 40, 40), (40, 190, 60), (40, 60, 220), (230, 220, 40), (200, 60, 200),
    (60, 200, 200), (250, 140, 20), (120, 120, 120), (20, 20, 20), (245, 245, 245),
]  # fmt: skip


@contextlib.contextmanager
def moto_server() -> Iterator[StorageSettings]:
    port = free_port()
    moto = Path(sys.executable).with_name("moto_server")
    process = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        settings = StorageSettings(
            endpoint=f"http://127.0.0.1:{port}", access_key="gpucheck", secret_key="gpucheck"
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                settings.open().ensure_bucket(BUCKET)
                break
            except Exception:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)
        yield settings
    finally:
        process.terminate()
        process.wait(10)


def shape_image(label: int, rng: np.random.Generator, size: int) -> bytes:
    """Class = the colour of a shape on a noisy background."""
    noise = rng.integers(0, 256, (size, size, 3), dtype=np.uint8) // 3 + 60
    image = Image.fromarray(noise.astype(np.uint8))
    low, high = rng.integers(0, size // 4, 2), rng.integers(3 * size // 4, size, 2)
    ImageDraw.Draw(image).ellipse([*low.tolist(), *high.tolist()], fill=COLOURS[label])
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def upload_dataset(store: ObjectStore, sizes: Sizes) -> None:
    """Explicit train/ and val/ folders: the training set is a whole number of batches."""
    rng = np.random.default_rng(0)
    counts = {"train": sizes.per_class, "val": sizes.val_per_class}
    objects = [
        (f"data/{split}/class{label}/{i}.jpg", shape_image(label, rng, sizes.image_px))
        for split, count in counts.items()
        for label in range(sizes.classes)
        for i in range(count)
    ]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda item: store.put(BUCKET, *item), objects))
