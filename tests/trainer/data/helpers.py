"""Tiny generated datasets whose images say who they are (pixel (0, 0) encodes an id)."""

from __future__ import annotations

import io
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image

from refit.storage import ObjectStore


def png(ident: int, size: int = 4) -> bytes:
    image = Image.new("RGB", (size, size), (ident % 256, ident // 256 % 256, 7))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def jpeg(size: int = 8) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), (200, 10, 10)).save(out, format="JPEG")
    return out.getvalue()


def ident(image: Image.Image) -> torch.Tensor:
    """A transform that returns the image's id, so tests can follow every sample."""
    red, green, _ = image.getpixel((0, 0))
    return torch.tensor(red + 256 * green)


def image_objects(
    counts: dict[str, int], prefix: str = "ds/", start: int = 0
) -> dict[str, tuple[bytes, int, str]]:
    """key -> (png bytes, id, class) for ``counts[class]`` images per class."""
    objects, next_id = {}, start
    for cls in sorted(counts):
        for _ in range(counts[cls]):
            objects[f"{prefix}{cls}/img-{next_id:05d}.png"] = (png(next_id), next_id, cls)
            next_id += 1
    return objects


def put_all(store: ObjectStore, bucket: str, objects: dict[str, bytes], jobs: int = 8) -> None:
    store.ensure_bucket(bucket)
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(lambda item: store.put(bucket, item[0], item[1]), objects.items()))


def upload_images(
    store: ObjectStore, bucket: str, objects: dict[str, tuple[bytes, int, str]]
) -> None:
    put_all(store, bucket, {key: data for key, (data, _, _) in objects.items()})


def ids(samples: Iterable[tuple[torch.Tensor, int]]) -> list[int]:
    return [int(x) for x, _ in samples]


def batched_ids(loader: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> list[int]:
    return [int(i) for x, _ in loader for i in x]
