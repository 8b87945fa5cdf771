"""``refit dataset pack``: turn an ImageFolder prefix into WebDataset shards plus an index."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from refit.storage import ObjectStore, S3Uri
from trainer.data.index import INDEX_NAME, PackIndex, ShardInfo
from trainer.data.layout import (
    SPLITS,
    Listing,
    Sample,
    build_listing,
    list_objects,
    normalize_prefix,
    require_trainable,
)
from trainer.data.prefetch import prefetch
from trainer.data.retry import RetryPolicy, call_with_retry, is_transient_or_missing
from trainer.data.sharding import epoch_order
from trainer.data.tarformat import ShardWriter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackOptions:
    val_fraction: float = 0.2
    max_shard_bytes: int = 64 * 2**20  # bounds reader memory: shard_in_flight x this per worker
    max_shard_samples: int = 10_000
    in_flight: int = 8  # concurrent GETs while reading the source
    seed: int = 0  # order of samples across shards (mixed, so no shard is a single class)
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        if self.max_shard_bytes < 1 or self.max_shard_samples < 1 or self.in_flight < 1:
            raise ValueError(f"shard limits and in_flight must be positive: {self}")


def pack_dataset(store: ObjectStore, src: S3Uri, dst: S3Uri, options: PackOptions) -> PackIndex:
    """Write shards, then the index last: an index present means its shards are complete."""
    listing = build_listing(src, list_objects(store, src, options.retry), options.val_fraction)
    require_trainable(listing, "train")
    dst = normalize_prefix(dst)
    store.ensure_bucket(dst.bucket)
    splits = {split: tuple(_write_split(store, listing, split, dst, options)) for split in SPLITS}
    index = PackIndex(
        class_names=listing.class_names,
        splits=splits,
        class_counts={split: _class_counts(listing, split) for split in SPLITS},
        split_mode=listing.split_mode,
        val_fraction=options.val_fraction,
        source=str(listing.uri),
        source_digest=listing.digest,
    )
    store.put(dst.bucket, dst.key + INDEX_NAME, index.to_json())
    return index


def _write_split(
    store: ObjectStore, listing: Listing, split: str, dst: S3Uri, options: PackOptions
) -> Iterator[ShardInfo]:
    samples = epoch_order(listing.splits[split], seed=options.seed, epoch=0, shuffle=True)
    bucket = listing.uri.bucket

    def read(sample: Sample) -> bytes:
        return call_with_retry(
            lambda: store.get(bucket, sample.key),
            what=f"s3://{bucket}/{sample.key}",
            policy=options.retry,
            retry_if=is_transient_or_missing,
        )

    writer, number = ShardWriter(), 0
    for i, (sample, data) in enumerate(prefetch(read, samples, options.in_flight)):
        if writer.count and (
            writer.count >= options.max_shard_samples
            or writer.size() + len(data) > options.max_shard_bytes
        ):
            yield _flush(store, writer, dst, f"{split}-{number:06d}.tar")
            writer, number = ShardWriter(), number + 1
        ext = PurePosixPath(sample.key).suffix.lower().lstrip(".")
        writer.add(f"{i:08d}", ext, data, sample.label)
    if writer.count:
        yield _flush(store, writer, dst, f"{split}-{number:06d}.tar")


def _flush(store: ObjectStore, writer: ShardWriter, dst: S3Uri, name: str) -> ShardInfo:
    data = writer.finish()
    store.put(dst.bucket, dst.key + name, data)
    log.info("wrote %s%s (%d samples, %d bytes)", dst, name, writer.count, len(data))
    return ShardInfo(key=name, count=writer.count, size=len(data))


def _class_counts(listing: Listing, split: str) -> tuple[int, ...]:
    counts = [0] * len(listing.class_names)
    for sample in listing.splits[split]:
        counts[sample.label] += 1
    return tuple(counts)
