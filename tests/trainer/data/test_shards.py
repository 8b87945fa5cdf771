from __future__ import annotations

import collections
import random
from collections.abc import Iterator

import pytest
from torch.utils.data import DataLoader

from refit.storage import FileStore, S3Store, S3Uri
from tests.trainer.data.helpers import batched_ids, ident, ids, image_objects, upload_images
from trainer.data import PackFormatError, ReadOptions, TooManyBadImages, open_dataset
from trainer.data.errors import ResumeMismatch
from trainer.data.pack import PackOptions, pack_dataset
from trainer.data.shards import ShardDataset, shuffle_buffer

CLASSES = {"cat": 13, "dog": 11, "eel": 16}


@pytest.fixture
def uris(s3_store: S3Store, bucket: str) -> tuple[str, str]:
    upload_images(s3_store, bucket, image_objects(CLASSES))
    options = PackOptions(val_fraction=0.2, max_shard_samples=4)
    pack_dataset(s3_store, S3Uri(bucket, "ds"), S3Uri(bucket, "packed"), options)
    return f"s3://{bucket}/ds", f"s3://{bucket}/packed"


def test_packed_and_per_object_yield_the_same_samples(
    s3_store: S3Store, uris: tuple[str, str]
) -> None:
    for split in ("train", "val"):
        objects, packed = (
            open_dataset(uri, store=s3_store, split=split, transform=ident) for uri in uris
        )
        assert isinstance(packed, ShardDataset)
        assert packed.class_names == objects.class_names
        assert packed.num_samples == objects.num_samples
        assert packed.digest == objects.digest and packed.num_objects == objects.num_objects == 40
        as_pairs = collections.Counter((int(x), y) for x, y in objects)
        assert collections.Counter((int(x), y) for x, y in packed) == as_pairs


def test_exactly_once_across_two_ranks_and_two_workers(
    s3_store: S3Store, uris: tuple[str, str]
) -> None:
    _, packed_uri = uris
    seen, expected = [], None
    for rank in range(2):
        ds = open_dataset(packed_uri, store=s3_store, transform=ident, rank=rank, world_size=2)
        expected = ds.num_samples
        seen += batched_ids(DataLoader(ds, batch_size=3, num_workers=2))
    assert len(seen) == len(set(seen)) == expected


def test_shuffle_differs_between_epochs_and_is_reproducible(
    s3_store: S3Store, uris: tuple[str, str]
) -> None:
    def order(seed: int, epoch: int) -> list[int]:
        ds = open_dataset(uris[1], store=s3_store, transform=ident, seed=seed)
        ds.set_epoch(epoch)
        return ids(ds)

    assert order(3, 0) == order(3, 0)
    assert order(3, 0) != order(3, 1)
    assert sorted(order(3, 0)) == sorted(order(3, 1))
    assert order(3, 0) != order(4, 0)


def test_resume_with_the_same_workers_continues_exactly(
    s3_store: S3Store, uris: tuple[str, str]
) -> None:
    def dataset() -> ShardDataset:
        options = ReadOptions(batch_size=2, shuffle_buffer=5)
        return open_dataset(uris[1], store=s3_store, transform=ident, options=options)

    full = dataset()
    full.set_epoch(2)
    epoch = batched_ids(DataLoader(full, batch_size=2, num_workers=2))

    interrupted = dataset()
    interrupted.set_epoch(2)
    loader = iter(DataLoader(interrupted, batch_size=2, num_workers=2))
    for _ in range(5):
        interrupted.advance(len(next(loader)[1]))
    del loader
    resumed = dataset()
    resumed.load_state_dict(interrupted.state_dict())
    rest = batched_ids(DataLoader(resumed, batch_size=2, num_workers=2))
    # The DataLoader restarts its round-robin at worker 0, so only the order may differ.
    assert sorted(rest) == sorted(epoch[10:])


def test_resume_refuses_another_dataset(s3_store: S3Store, uris: tuple[str, str]) -> None:
    packed = open_dataset(uris[1], store=s3_store, transform=ident, seed=1)
    state = packed.state_dict()
    with pytest.raises(ResumeMismatch, match="seed"):
        open_dataset(uris[1], store=s3_store, transform=ident, seed=2).load_state_dict(state)
    with pytest.raises(ResumeMismatch, match="world_size"):
        two_ranks = open_dataset(
            uris[1], store=s3_store, transform=ident, seed=1, rank=0, world_size=2
        )
        two_ranks.load_state_dict(state)


def test_val_fraction_must_match_the_pack(s3_store: S3Store, uris: tuple[str, str]) -> None:
    with pytest.raises(PackFormatError, match=r"val_fraction=0\.2"):
        open_dataset(uris[1], store=s3_store, transform=ident, val_fraction=0.3)


def test_bad_records_in_shards_count_against_the_budget(file_store: FileStore) -> None:
    upload_images(file_store, "bkt", image_objects({"a": 10, "b": 10}))
    file_store.put("bkt", "ds/a/broken.png", b"garbage")
    pack_dataset(file_store, S3Uri("bkt", "ds"), S3Uri("bkt", "p"), PackOptions(val_fraction=0.0))
    ok = open_dataset("s3://bkt/p", store=file_store, transform=ident, val_fraction=0.0)
    assert sorted(ids(ok)) == list(range(20))
    strict = open_dataset(
        "s3://bkt/p", store=file_store, transform=ident, val_fraction=0.0, max_bad_fraction=0.0
    )
    with pytest.raises(TooManyBadImages):
        list(strict)


def test_shuffle_buffer_is_a_seeded_permutation() -> None:
    items = list(range(100))
    a = list(shuffle_buffer(items, 10, random.Random(1)))
    assert sorted(a) == items and a != items
    assert a == list(shuffle_buffer(items, 10, random.Random(1)))
    assert list(shuffle_buffer(items, 0, random.Random(1))) == items
    assert sorted(shuffle_buffer(items[:3], 10, random.Random(1))) == items[:3]


def test_shuffle_buffer_starts_early_and_stays_bounded() -> None:
    pulled: list[int] = []

    def source() -> Iterator[int]:
        for i in range(1000):
            pulled.append(i)
            yield i

    out: list[int] = []
    for item in shuffle_buffer(source(), 50, random.Random(0), initial=10):
        out.append(item)
        assert len(pulled) - len(out) < 50  # never holds more than the buffer size
        if len(out) == 1:
            assert len(pulled) <= 11  # output started long before the buffer was full
    assert sorted(out) == list(range(1000))
    assert max(abs(pos - value) for pos, value in enumerate(out)) > 25
