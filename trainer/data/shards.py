"""The packed dataset: WebDataset tar shards read sequentially through a shuffle buffer."""

from __future__ import annotations

import functools
import random
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any, TypeVar

import torch

from refit.storage import ObjectStore
from trainer import metrics
from trainer.data.base import EpochDataset, store_for_this_process
from trainer.data.decode import BadImage, BadImageBudget, decode_image
from trainer.data.index import ShardInfo
from trainer.data.prefetch import prefetch
from trainer.data.retry import call_with_retry, is_transient_or_missing
from trainer.data.sharding import (
    consumed_by_worker,
    current_consumer,
    epoch_order,
    for_rank,
    for_worker,
)
from trainer.data.tarformat import Record, iter_records, record_sample

T = TypeVar("T")


def shuffle_buffer(
    items: Iterable[T], size: int, rng: random.Random, initial: int = 100
) -> Iterator[T]:
    """Shuffle through a buffer of at most ``size`` items; ``size`` 0 keeps the order.

    Output starts once ``initial`` items are buffered (not ``size``, which could be a whole
    worker's share of a small dataset); the buffer then grows by two reads per output until full.
    """
    source = iter(items)
    if size <= 0:
        yield from source
        return
    initial = max(1, min(initial, size))
    buffer: list[T] = []
    for item in source:
        buffer.append(item)
        if len(buffer) < size:
            buffer.extend(islice(source, 1))
        if len(buffer) >= initial:
            yield _take_random(buffer, rng)
    while buffer:
        yield _take_random(buffer, rng)


def _take_random(buffer: list[T], rng: random.Random) -> T:
    i = rng.randrange(len(buffer))
    buffer[i], buffer[-1] = buffer[-1], buffer[i]
    return buffer.pop()


class ShardDataset(EpochDataset):
    """Reads whole shards sequentially (a few fetched ahead), through a seeded shuffle buffer.

    Shards, not samples, are dealt to ranks and then workers, so use at least
    ranks x workers shards per split. Resuming skips the already-consumed records of each
    worker's stream (read again, not decoded); with the same num_workers and batch_size the
    rest of the epoch is exactly the unconsumed samples, though interleaved from worker 0 again.
    """

    def __init__(
        self,
        store: ObjectStore,
        bucket: str,
        prefix: str,
        shards: tuple[ShardInfo, ...],
        **kwargs: Any,
    ) -> None:
        super().__init__(num_samples=sum(s.count for s in shards), **kwargs)
        self.store, self.bucket, self.prefix, self.shards = store, bucket, prefix, shards

    def __len__(self) -> int:
        order = epoch_order(self.shards, seed=self.seed, epoch=self.epoch, shuffle=self.shuffle)
        return sum(s.count for s in for_rank(order, self.rank, self.world_size))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        consumer = current_consumer(self.rank, self.world_size)
        order = epoch_order(self.shards, seed=self.seed, epoch=self.epoch, shuffle=self.shuffle)
        ranked = for_rank(order, consumer.rank, consumer.world_size)
        mine = for_worker(ranked, consumer.worker, consumer.num_workers)
        skip = consumed_by_worker(
            self.progress.skip, consumer.worker, consumer.num_workers, self.options.batch_size
        )
        total = max(0, sum(s.count for s in mine) - skip)
        budget = BadImageBudget(total, self.options.max_bad_fraction)
        rng = random.Random(f"refit-buffer:{self.seed}:{self.epoch}:{consumer.seed_key}")
        size = self.options.shuffle_buffer if self.shuffle else 0
        for key, record in islice(shuffle_buffer(self._records(mine), size, rng), skip, None):
            try:
                data, label = record_sample(record)
                image = decode_image(data, self.options.decode)
            except BadImage as exc:
                budget.record(key, exc)
                continue
            yield self.transform(image), label

    def _records(self, shards: list[ShardInfo]) -> Iterator[tuple[str, Record]]:
        store = store_for_this_process(self.store)
        fetch = functools.partial(self._fetch, store)
        for shard, data in prefetch(fetch, shards, self.options.shard_in_flight):
            for key, record in iter_records(data):
                yield f"{shard.key}/{key}", record

    def _fetch(self, store: ObjectStore, shard: ShardInfo) -> bytes:
        key = self.prefix + shard.key
        data = call_with_retry(
            lambda: store.get(self.bucket, key),
            what=f"s3://{self.bucket}/{key}",
            policy=self.options.retry,
            retry_if=is_transient_or_missing,
        )
        metrics.DATASET_OBJECTS_READ.labels("shard").inc()
        metrics.DATASET_BYTES_READ.labels("shard").inc(len(data))
        return data
