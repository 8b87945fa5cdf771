"""Per-object streaming: one GET per image, a few in flight per DataLoader worker."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import torch
from PIL import Image

from refit.storage import ObjectStore
from trainer import metrics
from trainer.data.base import EpochDataset, store_for_this_process
from trainer.data.decode import BadImage, BadImageBudget, decode_image
from trainer.data.layout import Sample
from trainer.data.prefetch import prefetch
from trainer.data.retry import call_with_retry, is_transient_or_missing
from trainer.data.sharding import current_consumer, epoch_order, for_rank, for_worker

# Small images from a nearby store take less time to fetch and decode than to hand to a thread:
# 4 per hand-off cut the CPU time of an epoch's data work by 1.3x (docs/benchmarks.md). GETs in
# flight stay at ReadOptions.in_flight; decoded images waiting for the consumer: 4x that.
FETCHES_PER_TASK = 4


class ObjectDataset(EpochDataset):
    """Streams ``samples`` from ``store``; each DataLoader worker reads through its own copy of
    the store, so it opens its own connection pool (see ``store_for_this_process``)."""

    def __init__(
        self, store: ObjectStore, bucket: str, samples: tuple[Sample, ...], **kwargs: Any
    ) -> None:
        super().__init__(num_samples=len(samples), **kwargs)
        self.store, self.bucket, self.samples = store, bucket, samples

    def worker_samples(self) -> list[Sample]:
        """This (rank, worker)'s samples for the current epoch, after any resume skip."""
        consumer = current_consumer(self.rank, self.world_size)
        order = epoch_order(self.samples, seed=self.seed, epoch=self.epoch, shuffle=self.shuffle)
        mine = for_rank(order, consumer.rank, consumer.world_size)[self.progress.skip :]
        return for_worker(mine, consumer.worker, consumer.num_workers, self.options.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        samples = self.worker_samples()
        budget = BadImageBudget(len(samples), self.options.max_bad_fraction)
        store = store_for_this_process(self.store)
        fetch = functools.partial(self._fetch, store)
        fetched = prefetch(fetch, samples, self.options.in_flight, per_task=FETCHES_PER_TASK)
        for sample, image in fetched:
            if isinstance(image, BadImage):
                budget.record(sample.key, image)
                continue
            yield self.transform(image), sample.label

    def _fetch(self, store: ObjectStore, sample: Sample) -> Image.Image | BadImage:
        """Runs in a prefetch thread: GET (retried) and decode, so decoding overlaps I/O too."""
        data = call_with_retry(
            lambda: store.get(self.bucket, sample.key),
            what=f"s3://{self.bucket}/{sample.key}",
            policy=self.options.retry,
            retry_if=is_transient_or_missing,
        )
        metrics.DATASET_OBJECTS_READ.labels("image").inc()
        metrics.DATASET_BYTES_READ.labels("image").inc(len(data))
        try:
            return decode_image(data, self.options.decode)
        except BadImage as exc:
            return exc
