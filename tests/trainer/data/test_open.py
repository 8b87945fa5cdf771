"""Errors that must come before training starts, on both storage backends."""

from __future__ import annotations

import pytest

from refit.storage import FileStore, ObjectStore, S3Store
from tests.trainer.data.helpers import ident, image_objects, png, put_all, upload_images
from trainer.data import (
    DatasetError,
    DatasetNotFound,
    EmptyDataset,
    PackFormatError,
    TooFewClasses,
    open_dataset,
)
from trainer.data.index import INDEX_NAME
from trainer.data.objects import ObjectDataset


@pytest.fixture(params=["s3", "file"])
def store_and_bucket(request: pytest.FixtureRequest) -> tuple[ObjectStore, str]:
    if request.param == "s3":
        return request.getfixturevalue("s3_store"), request.getfixturevalue("bucket")
    store: FileStore = request.getfixturevalue("file_store")
    store.ensure_bucket("data")
    return store, "data"


def test_missing_bucket(store_and_bucket: tuple[ObjectStore, str]) -> None:
    store, _ = store_and_bucket
    with pytest.raises(DatasetNotFound, match="no-such-bucket") as err:
        open_dataset("s3://no-such-bucket/ds", store=store, transform=ident)
    assert "does not exist" in err.value.message


def test_missing_prefix(store_and_bucket: tuple[ObjectStore, str]) -> None:
    store, bucket = store_and_bucket
    upload_images(store, bucket, image_objects({"a": 2, "b": 2}))
    with pytest.raises(DatasetNotFound, match="no objects under"):
        open_dataset(f"s3://{bucket}/dss", store=store, transform=ident)


def test_no_images(store_and_bucket: tuple[ObjectStore, str]) -> None:
    store, bucket = store_and_bucket
    put_all(store, bucket, {"ds/readme.txt": b"x", "ds/cat/notes.md": b"y"})
    with pytest.raises(EmptyDataset, match="no images"):
        open_dataset(f"s3://{bucket}/ds", store=store, transform=ident)


def test_single_class(store_and_bucket: tuple[ObjectStore, str]) -> None:
    store, bucket = store_and_bucket
    put_all(store, bucket, {"ds/cat/a.png": png(1), "ds/cat/b.png": png(2)})
    with pytest.raises(TooFewClasses) as err:
        open_dataset(f"s3://{bucket}/ds", store=store, transform=ident)
    assert isinstance(err.value, DatasetError) and "'cat'" in err.value.message


def test_explicit_val_prefix(store_and_bucket: tuple[ObjectStore, str]) -> None:
    store, bucket = store_and_bucket
    put_all(
        store,
        bucket,
        {
            "ds/train/cat/1.png": png(1),
            "ds/train/dog/2.png": png(2),
            "ds/train/dog/3.png": png(3),
            "ds/val/cat/4.png": png(4),
            "ds/val/dog/5.png": png(5),
        },
    )
    train = open_dataset(f"s3://{bucket}/ds", store=store, transform=ident, split="train")
    val = open_dataset(f"s3://{bucket}/ds", store=store, transform=ident, split="val")
    assert isinstance(train, ObjectDataset)
    assert sorted((int(x), y) for x, y in train) == [(1, 0), (2, 1), (3, 1)]
    assert sorted((int(x), y) for x, y in val) == [(4, 0), (5, 1)]


def test_a_broken_pack_index_is_a_clear_error(s3_store: S3Store, bucket: str) -> None:
    put_all(s3_store, bucket, {f"p/{INDEX_NAME}": b"{not json"})
    with pytest.raises(PackFormatError, match="not a valid pack index"):
        open_dataset(f"s3://{bucket}/p", store=s3_store, transform=ident)


def test_argument_validation(s3_store: S3Store, bucket: str) -> None:
    with pytest.raises(ValueError, match="split"):
        open_dataset(f"s3://{bucket}/ds", store=s3_store, transform=ident, split="test")
    with pytest.raises(ValueError, match="val_fraction"):
        open_dataset(f"s3://{bucket}/ds", store=s3_store, transform=ident, val_fraction=1.0)
    with pytest.raises(ValueError, match="s3://"):
        open_dataset("/local/path", store=s3_store, transform=ident)
