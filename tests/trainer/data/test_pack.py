from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from refit.storage import S3Store, S3Uri
from tests.trainer.data.helpers import image_objects, png, put_all, upload_images
from trainer.data import TooFewClasses
from trainer.data.index import INDEX_NAME, PackIndex
from trainer.data.pack import PackOptions, pack_dataset

CLASSES = {"cat": 13, "dog": 11, "eel": 16}


@pytest.fixture
def packed(s3_store: S3Store, bucket: str) -> PackIndex:
    upload_images(s3_store, bucket, image_objects(CLASSES))
    options = PackOptions(val_fraction=0.25, max_shard_samples=6)
    return pack_dataset(s3_store, S3Uri(bucket, "ds"), S3Uri(bucket, "packed"), options)


def test_index_describes_the_shards(s3_store: S3Store, bucket: str, packed: PackIndex) -> None:
    stored = PackIndex.from_json(s3_store.get(bucket, f"packed/{INDEX_NAME}"), "index")
    assert stored == packed
    assert packed.class_names == ("cat", "dog", "eel")
    assert packed.count("train") + packed.count("val") == packed.num_objects == 40
    assert sum(packed.class_counts["train"]) == packed.count("train")
    assert all(shard.count <= 6 for shards in packed.splits.values() for shard in shards)
    assert [s.key for s in packed.splits["train"]][:2] == ["train-000000.tar", "train-000001.tar"]
    for shard in packed.splits["train"]:
        assert s3_store.stat(bucket, f"packed/{shard.key}").size == shard.size
    assert json.loads(packed.to_json())["format"] == "refit-webdataset/1"


def test_shards_mix_classes(s3_store: S3Store, bucket: str, packed: PackIndex) -> None:
    first = s3_store.get(bucket, "packed/train-000000.tar")
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        labels = {tar.extractfile(m).read() for m in tar if m.name.endswith(".cls")}
    assert len(labels) > 1


def test_webdataset_library_reads_the_shards(
    s3_store: S3Store, bucket: str, packed: PackIndex, tmp_path: Path
) -> None:
    paths = []
    for shard in packed.splits["train"]:
        path = tmp_path / shard.key
        path.write_bytes(s3_store.get(bucket, f"packed/{shard.key}"))
        paths.append(str(path))
    samples = list(wds.WebDataset(paths, shardshuffle=False).decode("pil").to_tuple("png", "cls"))
    assert len(samples) == packed.count("train")
    source = {img_id: cls for _, img_id, cls in image_objects(CLASSES).values()}
    for image, label in samples:
        red, green, _ = image.convert("RGB").getpixel((0, 0))
        assert packed.class_names[label] == source[red + 256 * green]


def test_packing_is_reproducible(s3_store: S3Store, bucket: str, packed: PackIndex) -> None:
    again = pack_dataset(
        s3_store,
        S3Uri(bucket, "ds"),
        S3Uri(bucket, "again"),
        PackOptions(val_fraction=0.25, max_shard_samples=6),
    )
    assert again.splits == packed.splits
    for shard in packed.splits["val"]:
        assert s3_store.get(bucket, f"packed/{shard.key}") == s3_store.get(
            bucket, f"again/{shard.key}"
        )


def test_shard_size_limit(s3_store: S3Store, bucket: str) -> None:
    upload_images(s3_store, bucket, image_objects({"a": 10, "b": 10}))
    index = pack_dataset(
        s3_store,
        S3Uri(bucket, "ds"),
        S3Uri(bucket, "small"),
        PackOptions(val_fraction=0.0, max_shard_bytes=8 * 1024),
    )
    assert len(index.splits["train"]) > 1
    assert all(s.size <= 8 * 1024 + 1024 * 10 for s in index.splits["train"])  # + tar trailer


def test_pack_refuses_a_single_class(s3_store: S3Store, bucket: str) -> None:
    put_all(s3_store, bucket, {"ds/cat/a.png": png(1), "ds/cat/b.png": png(2)})
    with pytest.raises(TooFewClasses):
        pack_dataset(s3_store, S3Uri(bucket, "ds"), S3Uri(bucket, "out"), PackOptions())
    assert s3_store.stat(bucket, f"out/{INDEX_NAME}") is None
