from __future__ import annotations

from collections.abc import Iterator

import pytest
from torch.utils.data import DataLoader, IterableDataset

from refit.storage import S3Store
from trainer.data.base import ReadOptions, store_for_this_process


class ClientProbe(IterableDataset):
    """Yields whether the store it reads with still has to open its client."""

    def __init__(self, store: S3Store) -> None:
        self.store = store

    def __iter__(self) -> Iterator[bool]:
        store = store_for_this_process(self.store)
        yield store._client is None


def test_each_worker_opens_its_own_client(s3_store: S3Store, bucket: str) -> None:
    assert s3_store._client is not None  # the fixture used it in this process
    in_workers = list(DataLoader(ClientProbe(s3_store), batch_size=None, num_workers=2))
    assert in_workers == [True, True]  # not the parent's client, inherited through fork
    assert list(ClientProbe(s3_store)) == [False]  # in-process: the same store and client


def test_read_options_validation() -> None:
    with pytest.raises(ValueError):
        ReadOptions(in_flight=0)
    with pytest.raises(ValueError):
        ReadOptions(batch_size=0)
    with pytest.raises(ValueError):
        ReadOptions(shuffle_buffer=-1)
