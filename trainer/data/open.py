"""``open_dataset``: the one entry point the fine-tuning engine uses."""

from __future__ import annotations

from dataclasses import replace

from refit.storage import NoSuchBucket, ObjectStore, S3Uri
from trainer.data.base import EpochDataset, ReadOptions, Transform
from trainer.data.errors import DatasetNotFound, EmptyDataset, PackFormatError
from trainer.data.index import INDEX_NAME, PackIndex
from trainer.data.layout import SPLITS, build_listing, list_objects, normalize_prefix
from trainer.data.layout import require_trainable as require_trainable_listing
from trainer.data.objects import ObjectDataset
from trainer.data.retry import RetryPolicy, call_with_retry
from trainer.data.sharding import resolve_world
from trainer.data.shards import ShardDataset


def open_dataset(
    uri: str,
    *,
    store: ObjectStore,
    split: str = "train",
    transform: Transform,
    val_fraction: float = 0.2,
    seed: int = 0,
    shuffle: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    max_bad_fraction: float = 0.05,
    options: ReadOptions | None = None,
) -> EpochDataset:
    """Packed shards when PREFIX holds a pack index, otherwise per-object streaming.

    Lists (or reads the index) now, so a missing prefix, no images or a single class fail here,
    before training starts. ``rank``/``world_size`` default to torch.distributed's.
    ``max_bad_fraction`` overrides the field of the same name in ``options``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    prefix = normalize_prefix(S3Uri.parse(uri))
    options = replace(options or ReadOptions(), max_bad_fraction=max_bad_fraction)
    rank, world_size = resolve_world(rank, world_size)
    common = {"seed": seed, "shuffle": shuffle, "rank": rank, "world_size": world_size}
    common |= {"transform": transform, "options": options}
    index = read_index(store, prefix, options.retry)
    if index is not None:
        return _open_packed(store, prefix, index, split, val_fraction, common)
    listing = build_listing(prefix, list_objects(store, prefix, options.retry), val_fraction)
    require_trainable_listing(listing, split)
    return ObjectDataset(
        store,
        prefix.bucket,
        listing.splits[split],
        class_names=listing.class_names,
        num_objects=listing.num_objects,
        digest=listing.digest,
        **common,
    )


def read_index(store: ObjectStore, prefix: S3Uri, retry: RetryPolicy) -> PackIndex | None:
    """The pack index under ``prefix``, or None when the prefix is not a packed dataset."""
    prefix = normalize_prefix(prefix)
    key = prefix.key + INDEX_NAME
    try:
        what = f"s3://{prefix.bucket}/{key}"
        if call_with_retry(lambda: store.stat(prefix.bucket, key), what=what, policy=retry) is None:
            return None
        data = call_with_retry(lambda: store.get(prefix.bucket, key), what=what, policy=retry)
    except NoSuchBucket as exc:
        raise DatasetNotFound(f"bucket {prefix.bucket!r} does not exist ({prefix})") from exc
    return PackIndex.from_json(data, f"s3://{prefix.bucket}/{key}")


def _open_packed(
    store: ObjectStore,
    prefix: S3Uri,
    index: PackIndex,
    split: str,
    val_fraction: float,
    common: dict,
) -> ShardDataset:
    if index.split_mode == "hash" and abs(index.val_fraction - val_fraction) > 1e-9:
        raise PackFormatError(
            f"{prefix} was packed with val_fraction={index.val_fraction:g}; pass that value "
            f"or re-pack with --val-fraction {val_fraction:g}"
        )
    if not index.splits.get(split):
        raise EmptyDataset(f"the {split!r} split of {prefix} has no shards")
    return ShardDataset(
        store,
        prefix.bucket,
        prefix.key,
        index.splits[split],
        class_names=index.class_names,
        num_objects=index.num_objects,
        digest=index.source_digest,
        **common,
    )
