from __future__ import annotations

from pathlib import Path

import pytest

from refit.storage import ObjectInfo, S3Store, S3Uri
from tests.trainer.data.helpers import jpeg, png
from trainer.data.upload import file_md5, same_content, upload_dir


def make_tree(root: Path, images: int = 12) -> None:
    for i in range(images):
        path = root / ("cat" if i % 2 else "dog") / "sub" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png(i))
    (root / "cat" / "photo.JPG").write_bytes(jpeg())
    (root / "notes.txt").write_text("not an image")


def test_upload_is_resumable(s3_store: S3Store, bucket: str, tmp_path: Path) -> None:
    make_tree(tmp_path)
    first = upload_dir(s3_store, tmp_path, S3Uri(bucket, "ds"), jobs=4)
    assert (first.uploaded, first.skipped) == (13, 0)
    assert first.ignored == ("notes.txt",)
    assert s3_store.get(bucket, "ds/cat/sub/1.png") == png(1)
    assert s3_store.stat(bucket, "ds/notes.txt") is None

    second = upload_dir(s3_store, tmp_path, S3Uri(bucket, "ds"), jobs=4)
    assert (second.uploaded, second.skipped, second.bytes_uploaded) == (0, 13, 0)

    (tmp_path / "dog" / "sub" / "0.png").write_bytes(png(500))  # changed content
    (tmp_path / "dog" / "new.png").write_bytes(png(501))
    s3_store.delete(bucket, "ds/cat/sub/1.png")  # an interrupted earlier run
    third = upload_dir(s3_store, tmp_path, S3Uri(bucket, "ds"), jobs=4)
    assert (third.uploaded, third.skipped) == (3, 11)
    assert s3_store.get(bucket, "ds/dog/sub/0.png") == png(500)


def test_upload_creates_the_bucket(s3_store: S3Store, bucket: str, tmp_path: Path) -> None:
    make_tree(tmp_path, images=2)
    report = upload_dir(s3_store, tmp_path, S3Uri(f"{bucket}-new", ""))
    assert report.uploaded == 3
    assert s3_store.stat(f"{bucket}-new", "dog/sub/0.png") is not None


def test_upload_needs_a_directory(s3_store: S3Store, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        upload_dir(s3_store, tmp_path / "missing", S3Uri("b", "ds"))


def test_same_content_compares_etags(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(png(1))
    size, md5 = path.stat().st_size, file_md5(path)
    assert same_content(path, ObjectInfo("k", size, md5))
    assert not same_content(path, ObjectInfo("k", size, "0" * 32))
    assert not same_content(path, ObjectInfo("k", size + 1, md5))
    assert not same_content(path, None)
    assert same_content(path, ObjectInfo("k", size, "abc-3"))  # multipart: size only
