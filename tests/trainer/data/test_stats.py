from __future__ import annotations

import pytest

from refit.storage import FileStore, S3Store, S3Uri
from tests.trainer.data.helpers import image_objects, jpeg, put_all, upload_images
from trainer.data import DatasetNotFound
from trainer.data.stats import dataset_stats


def test_counts_bytes_and_bad_files(s3_store: S3Store, bucket: str) -> None:
    objects = image_objects({"cat": 5, "dog": 7})
    upload_images(s3_store, bucket, objects)
    put_all(s3_store, bucket, {"ds/dog/cut.jpg": jpeg(64)[:150], "ds/readme.md": b"hi"})
    stats = dataset_stats(s3_store, S3Uri(bucket, "ds"), val_fraction=0.0)
    assert stats.class_names == ("cat", "dog")
    assert stats.counts == {"train": {"cat": 5, "dog": 8}, "val": {"cat": 0, "dog": 0}}
    assert stats.images == 13
    assert stats.bytes == sum(len(data) for data, _, _ in objects.values()) + 150
    assert stats.ignored == ("ds/readme.md",)
    assert [(b.key, b.reason) for b in stats.bad] == [("ds/dog/cut.jpg", "undecodable")]
    assert dataset_stats(s3_store, S3Uri(bucket, "ds"), verify=False).bad is None


def test_stats_on_filestore_and_missing_prefix(file_store: FileStore) -> None:
    upload_images(file_store, "data", image_objects({"a": 3, "b": 2}))
    stats = dataset_stats(file_store, S3Uri("data", "ds"), val_fraction=0.5)
    assert sum(stats.counts["train"].values()) + sum(stats.counts["val"].values()) == 5
    assert stats.bad == ()
    with pytest.raises(DatasetNotFound):
        dataset_stats(file_store, S3Uri("data", "nope"))
