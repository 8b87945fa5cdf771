"""Listing and splitting an ImageFolder-style dataset: ``PREFIX/<class>/<...>/<image>``.

Class index = position in the sorted class names (over both splits), so train and val agree.
The validation split is either explicit (``PREFIX/train/<class>/...`` and
``PREFIX/val/<class>/...``) or chosen by a hash of the key relative to PREFIX: a key's split never
changes as the dataset grows or moves to another bucket.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath

from refit.storage import NoSuchBucket, ObjectInfo, ObjectStore, S3Uri
from trainer.data.errors import DatasetNotFound, EmptyDataset, TooFewClasses
from trainer.data.retry import RetryPolicy, call_with_retry

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
SPLITS = ("train", "val")


@dataclass(frozen=True)
class Sample:
    key: str  # full object key
    label: int
    size: int


@dataclass(frozen=True)
class Listing:
    uri: S3Uri  # key is the prefix, "" or ending in "/"
    class_names: tuple[str, ...]
    splits: dict[str, tuple[Sample, ...]]
    split_mode: str  # "prefix" (explicit train/ and val/) or "hash"
    digest: str  # sha256 over relative keys and etags of every image
    ignored: tuple[str, ...]  # keys that are not images in a class folder

    @property
    def num_objects(self) -> int:
        return sum(len(samples) for samples in self.splits.values())


def normalize_prefix(uri: S3Uri) -> S3Uri:
    key = uri.key.strip("/")
    return S3Uri(uri.bucket, f"{key}/" if key else "")


def is_image(key: str) -> bool:
    return PurePosixPath(key).suffix.lower() in IMAGE_EXTENSIONS


def hash_split(relative_key: str, val_fraction: float) -> str:
    point = int.from_bytes(hashlib.sha256(relative_key.encode()).digest()[:8], "big") / 2**64
    return "val" if point < val_fraction else "train"


def list_objects(store: ObjectStore, uri: S3Uri, retry: RetryPolicy) -> list[ObjectInfo]:
    """Everything under the prefix (retried as a whole on transient errors)."""
    uri = normalize_prefix(uri)
    try:
        objects = call_with_retry(
            lambda: list(store.list(uri.bucket, uri.key)), what=f"listing {uri}", policy=retry
        )
    except NoSuchBucket as exc:
        raise DatasetNotFound(f"bucket {uri.bucket!r} does not exist ({uri})") from exc
    if not objects:
        raise DatasetNotFound(f"no objects under {uri}: check the bucket and prefix")
    return objects


def build_listing(uri: S3Uri, objects: Iterable[ObjectInfo], val_fraction: float) -> Listing:
    """Assign every image a class and a split; anything else is ignored (and reported)."""
    uri = normalize_prefix(uri)
    objects = sorted(objects, key=lambda o: o.key)
    relative = {o.key: o.key[len(uri.key) :] for o in objects}
    explicit = _has_explicit_split(relative.values())
    placed: list[tuple[ObjectInfo, str, str]] = []  # (object, split, class)
    ignored = []
    for obj in objects:
        where = _place(relative[obj.key], explicit, val_fraction)
        if where is None:
            ignored.append(obj.key)
        else:
            placed.append((obj, *where))
    class_names = tuple(sorted({cls for _, _, cls in placed}))
    label = {name: i for i, name in enumerate(class_names)}
    splits: dict[str, list[Sample]] = {split: [] for split in SPLITS}
    for obj, split, cls in placed:
        splits[split].append(Sample(obj.key, label[cls], obj.size))
    return Listing(
        uri=uri,
        class_names=class_names,
        splits={split: tuple(samples) for split, samples in splits.items()},
        split_mode="prefix" if explicit else "hash",
        digest=_digest((relative[o.key], o.etag) for o, _, _ in placed),
        ignored=tuple(ignored),
    )


def require_trainable(listing: Listing, split: str) -> None:
    """Fail before training starts rather than in the middle of it."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not listing.class_names:
        raise EmptyDataset(
            f"no images under {listing.uri} (expected PREFIX/<class>/<image> with one of "
            f"{sorted(IMAGE_EXTENSIONS)}; {len(listing.ignored)} other objects ignored)"
        )
    if len(listing.class_names) < 2:
        raise TooFewClasses(
            f"only one class ({listing.class_names[0]!r}) under {listing.uri}; "
            "a classifier needs at least two class folders"
        )
    if not listing.splits[split]:
        raise EmptyDataset(f"the {split!r} split of {listing.uri} has no images")


def _has_explicit_split(relative_keys: Iterable[str]) -> bool:
    tops = {key.split("/", 1)[0] for key in relative_keys if "/" in key and is_image(key)}
    return "train" in tops and tops <= set(SPLITS)


def _place(relative_key: str, explicit: bool, val_fraction: float) -> tuple[str, str] | None:
    parts = relative_key.split("/")
    if not is_image(relative_key) or any(p.startswith(".") for p in parts):
        return None
    if explicit:
        return (parts[0], parts[1]) if len(parts) >= 3 else None
    return (hash_split(relative_key, val_fraction), parts[0]) if len(parts) >= 2 else None


def _digest(entries: Iterable[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for key, etag in sorted(entries):
        h.update(f"{key}\t{etag}\n".encode())
    return h.hexdigest()
