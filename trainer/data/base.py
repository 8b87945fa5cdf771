"""What both dataset kinds share: identity, class index, epoch and resumption bookkeeping."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from refit.storage import ObjectStore
from trainer.data.decode import DecodeOptions
from trainer.data.progress import Progress
from trainer.data.retry import RetryPolicy

Transform = Callable[[Image.Image], torch.Tensor]


@dataclass(frozen=True)
class ReadOptions:
    """How a dataset reads; the defaults suit MinIO on a local network."""

    in_flight: int = 8  # concurrent GETs per worker (per-object); minio pools 10 connections
    shard_in_flight: int = 2  # shards fetched ahead per worker (packed datasets)
    shuffle_buffer: int = 2000  # samples (packed datasets); 0 disables shuffling within shards
    batch_size: int = 1  # the DataLoader's batch size: aligns worker shards so resuming is exact
    max_bad_fraction: float = 0.05
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    decode: DecodeOptions = field(default_factory=DecodeOptions)

    def __post_init__(self) -> None:
        if min(self.in_flight, self.shard_in_flight, self.batch_size) < 1:
            raise ValueError(f"in_flight, shard_in_flight and batch_size must be >= 1: {self}")
        if self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {self.shuffle_buffer}")


def store_for_this_process(store: ObjectStore) -> ObjectStore:
    """In a DataLoader worker, a copy of ``store`` with no client yet.

    Forked workers inherit the parent's objects without pickling, including an S3Store's client
    and its pooled sockets, which two processes must not share. A pickle round trip drops the
    client (S3Store pickles without it), so each worker opens its own connections lazily.
    """
    if get_worker_info() is None:
        return store
    return pickle.loads(pickle.dumps(store))


class EpochDataset(IterableDataset):
    """Base of the per-object and packed datasets. Subclasses implement ``__iter__``."""

    def __init__(
        self,
        *,
        class_names: tuple[str, ...],
        num_samples: int,
        num_objects: int,
        digest: str,
        seed: int,
        shuffle: bool,
        rank: int,
        world_size: int,
        transform: Transform,
        options: ReadOptions,
    ) -> None:
        super().__init__()
        self.class_names = list(class_names)
        self.num_samples = num_samples  # this split, all ranks
        self.num_objects = num_objects  # images in the whole dataset, both splits
        self.digest = digest
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.transform = transform
        self.options = options
        self.progress = Progress(digest=digest, seed=seed, world_size=world_size)

    def __len__(self) -> int:
        """Samples this rank yields per epoch (before any bad image is skipped)."""
        return len(range(self.rank, self.num_samples, self.world_size))

    @property
    def epoch(self) -> int:
        return self.progress.epoch

    def set_epoch(self, epoch: int) -> None:
        """Call before each epoch (and before creating the DataLoader iterator); with
        ``persistent_workers=True`` workers keep the epoch they started with."""
        self.progress.set_epoch(epoch)

    def advance(self, n: int) -> None:
        """Tell the dataset the training loop consumed ``n`` more samples on this rank."""
        self.progress.advance(n)

    def state_dict(self) -> dict:
        return self.progress.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.progress.load_state_dict(state)
