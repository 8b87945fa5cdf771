"""The trainer's data layer: ImageFolder-style datasets streamed from the object store.

    from trainer.data import open_dataset, DatasetError
    ds = open_dataset("s3://bucket/prefix", store=store, split="train", transform=t)

Modules by responsibility: ``layout`` (listing, classes, split), ``objects`` (per-object
streaming), ``shards``/``tarformat``/``index``/``pack`` (WebDataset shards), ``sharding``
(ranks x workers), ``progress`` (resumption), ``retry``, ``decode``, ``prefetch``;
``upload``/``stats`` back the CLI.
"""

from trainer.data.base import EpochDataset, ReadOptions
from trainer.data.decode import DecodeOptions
from trainer.data.errors import (
    DatasetError,
    DatasetNotFound,
    EmptyDataset,
    PackFormatError,
    ReadFailed,
    ResumeMismatch,
    TooFewClasses,
    TooManyBadImages,
)
from trainer.data.open import open_dataset
from trainer.data.retry import RetryPolicy

__all__ = [
    "DatasetError",
    "DatasetNotFound",
    "DecodeOptions",
    "EmptyDataset",
    "EpochDataset",
    "PackFormatError",
    "ReadFailed",
    "ReadOptions",
    "ResumeMismatch",
    "RetryPolicy",
    "TooFewClasses",
    "TooManyBadImages",
    "open_dataset",
]
