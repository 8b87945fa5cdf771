"""``refit dataset stats``: classes, counts, bytes and bad files of a dataset prefix."""

from __future__ import annotations

from dataclasses import dataclass

from refit.storage import ObjectStore, S3Uri
from trainer.data.decode import BadImage, DecodeOptions, decode_image
from trainer.data.layout import SPLITS, Listing, build_listing, list_objects, normalize_prefix
from trainer.data.prefetch import prefetch
from trainer.data.retry import RetryPolicy, call_with_retry, is_transient_or_missing


@dataclass(frozen=True)
class BadFile:
    key: str
    reason: str
    detail: str


@dataclass(frozen=True)
class DatasetStats:
    uri: str
    class_names: tuple[str, ...]
    counts: dict[str, dict[str, int]]  # split -> class -> images
    images: int
    bytes: int
    split_mode: str
    digest: str
    ignored: tuple[str, ...]  # objects that are not images in a class folder
    bad: tuple[BadFile, ...] | None  # None when images were not decoded (--no-verify)


def dataset_stats(
    store: ObjectStore,
    uri: S3Uri,
    *,
    val_fraction: float = 0.2,
    verify: bool = True,
    jobs: int = 8,
    decode: DecodeOptions | None = None,
    retry: RetryPolicy | None = None,
) -> DatasetStats:
    retry = retry or RetryPolicy()
    uri = normalize_prefix(uri)
    listing = build_listing(uri, list_objects(store, uri, retry), val_fraction)
    bad = _find_bad(store, listing, jobs, decode or DecodeOptions(), retry) if verify else None
    samples = [s for split in SPLITS for s in listing.splits[split]]
    return DatasetStats(
        uri=str(uri),
        class_names=listing.class_names,
        counts={split: _per_class(listing, split) for split in SPLITS},
        images=len(samples),
        bytes=sum(s.size for s in samples),
        split_mode=listing.split_mode,
        digest=listing.digest,
        ignored=listing.ignored,
        bad=bad,
    )


def _per_class(listing: Listing, split: str) -> dict[str, int]:
    counts = dict.fromkeys(listing.class_names, 0)
    for sample in listing.splits[split]:
        counts[listing.class_names[sample.label]] += 1
    return counts


def _find_bad(
    store: ObjectStore, listing: Listing, jobs: int, decode: DecodeOptions, retry: RetryPolicy
) -> tuple[BadFile, ...]:
    bucket = listing.uri.bucket

    def check(key: str) -> BadImage | None:
        data = call_with_retry(
            lambda: store.get(bucket, key),
            what=f"s3://{bucket}/{key}",
            policy=retry,
            retry_if=is_transient_or_missing,
        )
        try:
            decode_image(data, decode)
        except BadImage as exc:
            return exc
        return None

    keys = [s.key for split in SPLITS for s in listing.splits[split]]
    return tuple(
        BadFile(key, error.reason, error.detail)
        for key, error in prefetch(check, sorted(keys), jobs)
        if error is not None
    )
