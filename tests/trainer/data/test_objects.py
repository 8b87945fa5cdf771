"""Per-object streaming against a real S3 server (moto) and the embedded FileStore."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY
from torch.utils.data import DataLoader

from refit.storage import FileStore, S3Store
from tests.conftest import MotoServer
from tests.trainer.data.helpers import (
    batched_ids,
    ident,
    ids,
    image_objects,
    jpeg,
    png,
    put_all,
    upload_images,
)
from trainer.data import (
    ReadFailed,
    ReadOptions,
    RetryPolicy,
    TooManyBadImages,
    open_dataset,
)

CLASSES = {"cat": 13, "dog": 11, "eel": 16}  # 40 images, ids 0..39


def read_count(kind: str = "image") -> float:
    return REGISTRY.get_sample_value("refit_dataset_objects_read_total", {"kind": kind}) or 0.0


@pytest.fixture
def dataset_uri(s3_store: S3Store, bucket: str) -> str:
    upload_images(s3_store, bucket, image_objects(CLASSES))
    return f"s3://{bucket}/ds"


def test_exactly_once_across_two_ranks_and_two_workers(s3_store: S3Store, dataset_uri: str) -> None:
    seen: list[int] = []
    for rank in range(2):
        ds = open_dataset(
            dataset_uri, store=s3_store, transform=ident, val_fraction=0.0, rank=rank, world_size=2
        )
        assert ds.num_samples == 40 and len(ds) == 20
        seen += batched_ids(DataLoader(ds, batch_size=3, num_workers=2))
    assert sorted(seen) == list(range(40))


def test_labels_follow_sorted_class_folders(s3_store: S3Store, dataset_uri: str) -> None:
    ds = open_dataset(dataset_uri, store=s3_store, transform=ident, val_fraction=0.0)
    assert ds.class_names == ["cat", "dog", "eel"]
    assert ds.num_objects == 40 and len(ds.digest) == 64
    bounds = [(0, 13), (13, 24), (24, 40)]
    expected = {i: label for label, (lo, hi) in enumerate(bounds) for i in range(lo, hi)}
    assert {int(x): y for x, y in ds} == expected


def test_train_and_val_partition_the_images(s3_store: S3Store, dataset_uri: str) -> None:
    train = open_dataset(dataset_uri, store=s3_store, transform=ident, split="train")
    val = open_dataset(dataset_uri, store=s3_store, transform=ident, split="val")
    train_ids, val_ids = ids(train), ids(val)
    assert sorted(train_ids + val_ids) == list(range(40))
    assert 0 < len(val_ids) < 20
    assert train.digest == val.digest and train.class_names == val.class_names


def test_shuffle_differs_between_epochs_and_is_reproducible(
    s3_store: S3Store, dataset_uri: str
) -> None:
    def order(seed: int, epoch: int) -> list[int]:
        ds = open_dataset(dataset_uri, store=s3_store, transform=ident, val_fraction=0.0, seed=seed)
        ds.set_epoch(epoch)
        return ids(ds)

    epoch0, epoch1 = order(seed=7, epoch=0), order(seed=7, epoch=1)
    assert sorted(epoch0) == sorted(epoch1) == list(range(40))
    assert epoch0 != epoch1
    assert order(seed=7, epoch=0) == epoch0
    assert order(seed=8, epoch=0) != epoch0
    unshuffled = open_dataset(
        dataset_uri, store=s3_store, transform=ident, val_fraction=0.0, shuffle=False
    )
    assert ids(unshuffled) == list(range(40))


def test_more_than_one_listing_page(s3_store: S3Store, bucket: str) -> None:
    upload_images(s3_store, bucket, image_objects({"a": 520, "b": 485}))
    options = ReadOptions(in_flight=16)
    ds = open_dataset(
        f"s3://{bucket}/ds", store=s3_store, transform=ident, val_fraction=0.0, options=options
    )
    assert ds.num_samples == 1005
    assert sorted(ids(ds)) == list(range(1005))


def test_nested_folders_and_stray_files(s3_store: S3Store, bucket: str) -> None:
    put_all(
        s3_store,
        bucket,
        {
            "ds/cat/2024/jan/a.png": png(1),
            "ds/cat/b.PNG": png(2),
            "ds/dog/deep/c.png": png(3),
            "ds/dog/d.png": png(4),
            "ds/README.md": b"# about",
            "ds/top-level.png": png(99),
            "ds/dog/labels.csv": b"x,y",
            "ds/dog/.DS_Store": b"junk",
            "other/cat/e.png": png(98),
        },
    )
    ds = open_dataset(f"s3://{bucket}/ds/", store=s3_store, transform=ident, val_fraction=0.0)
    assert sorted((int(x), y) for x, y in ds) == [(1, 0), (2, 0), (3, 1), (4, 1)]


def test_bad_images_below_the_threshold_are_skipped_and_counted(
    s3_store: S3Store, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    objects = image_objects(CLASSES)
    upload_images(s3_store, bucket, objects)
    put_all(s3_store, bucket, {"ds/cat/broken.png": b"garbage", "ds/dog/cut.jpg": jpeg(64)[:200]})
    before = REGISTRY.get_sample_value("refit_dataset_bad_images_total", {"reason": "undecodable"})
    reads = read_count()
    uri = f"s3://{bucket}/ds"
    ds = open_dataset(uri, store=s3_store, transform=ident, val_fraction=0.0, max_bad_fraction=0.05)
    assert sorted(ids(ds)) == list(range(40))
    after = REGISTRY.get_sample_value("refit_dataset_bad_images_total", {"reason": "undecodable"})
    assert after - (before or 0) == 2
    assert read_count() - reads == 42
    assert "ds/cat/broken.png" in caplog.text and "ds/dog/cut.jpg" in caplog.text


def test_bad_images_above_the_threshold_fail_the_run(s3_store: S3Store, bucket: str) -> None:
    upload_images(s3_store, bucket, image_objects({"cat": 10, "dog": 10}))
    put_all(s3_store, bucket, {f"ds/cat/broken-{i}.png": b"garbage" for i in range(3)})
    ds = open_dataset(
        f"s3://{bucket}/ds", store=s3_store, transform=ident, val_fraction=0.0, max_bad_fraction=0.1
    )  # 23 images: 2 bad allowed
    with pytest.raises(TooManyBadImages, match="3 of 23"):
        list(DataLoader(ds, batch_size=4))


def test_filestore_backend_with_workers(file_store: FileStore) -> None:
    upload_images(file_store, "data", image_objects(CLASSES))
    ds = open_dataset("s3://data/ds", store=file_store, transform=ident, val_fraction=0.0)
    assert sorted(batched_ids(DataLoader(ds, batch_size=4, num_workers=2))) == list(range(40))


def test_resume_skips_what_was_trained_on(s3_store: S3Store, dataset_uri: str) -> None:
    def dataset():
        options = ReadOptions(batch_size=4)
        return open_dataset(
            dataset_uri, store=s3_store, transform=ident, val_fraction=0.0, options=options
        )

    full = dataset()
    full.set_epoch(3)
    epoch = batched_ids(DataLoader(full, batch_size=4, num_workers=2))
    assert sorted(epoch) == list(range(40))

    interrupted = dataset()
    interrupted.set_epoch(3)
    loader = iter(DataLoader(interrupted, batch_size=4, num_workers=2))
    for _ in range(3):
        _, labels = next(loader)
        interrupted.advance(len(labels))
    state = interrupted.state_dict()
    assert state["epoch"] == 3 and state["samples_seen"] == 12
    del loader

    # Another worker count yields the same order; the training loop sets the epoch it resumes.
    resumed = dataset()
    resumed.load_state_dict(state)
    resumed.set_epoch(3)
    assert batched_ids(DataLoader(resumed, batch_size=4, num_workers=1)) == epoch[12:]

    in_process = dataset()  # counters are per process: read in this one to count GETs
    in_process.load_state_dict(state)
    reads = read_count()
    assert batched_ids(DataLoader(in_process, batch_size=4)) == epoch[12:]
    assert read_count() - reads == 28
    in_process.set_epoch(4)
    assert sorted(ids(in_process)) == list(range(40))


@pytest.fixture
def private_moto() -> Iterator[MotoServer]:
    """A server of our own to stop and restart, so the session server's buckets survive."""
    server = MotoServer()
    server.start()
    yield server
    server.stop()


def test_server_restarted_mid_epoch_is_retried_until_it_recovers(private_moto: MotoServer) -> None:
    store = S3Store(private_moto.settings)
    objects = image_objects(CLASSES)
    upload_images(store, "restart", objects)
    retry = RetryPolicy(max_attempts=8, base_delay_s=0.2, max_delay_s=2.0)
    ds = open_dataset(
        "s3://restart/ds",
        store=store,
        transform=ident,
        val_fraction=0.0,
        options=ReadOptions(in_flight=2, retry=retry),
    )
    stream = iter(ds)
    first = [int(next(stream)[0]) for _ in range(10)]
    private_moto.stop()

    def restore() -> None:  # moto keeps nothing across a restart, so upload again
        time.sleep(1.0)
        private_moto.start()
        upload_images(S3Store(private_moto.settings), "restart", objects)

    restorer = threading.Thread(target=restore)
    restorer.start()
    rest = ids(stream)
    restorer.join()
    assert sorted(first + rest) == list(range(40))


def test_server_gone_for_good_fails_with_a_clear_error(private_moto: MotoServer) -> None:
    store = S3Store(private_moto.settings)
    upload_images(store, "gone", image_objects(CLASSES))
    retry = RetryPolicy(max_attempts=1)  # minio's own urllib3 retries already take ~6 s here
    ds = open_dataset(
        "s3://gone/ds",
        store=store,
        transform=ident,
        val_fraction=0.0,
        options=ReadOptions(in_flight=2, retry=retry),
    )
    stream = iter(ds)
    next(stream)
    private_moto.stop()
    started = time.monotonic()
    with pytest.raises(ReadFailed, match=r"gave up on s3://gone/ds/\w+/img-\d+\.png") as err:
        list(stream)
    assert "Max retries exceeded" in err.value.message or "Connection" in err.value.message
    assert time.monotonic() - started < 30
