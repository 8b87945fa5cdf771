"""Both storage backends honour one contract: the embedded FileStore and S3 (a real moto server)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from refit.storage import FileStore, NoSuchBucket, NoSuchObject, ObjectStore, S3Uri


@pytest.fixture(params=["file", "s3"])
def store_and_bucket(request: pytest.FixtureRequest) -> tuple[ObjectStore, str]:
    if request.param == "file":
        store = request.getfixturevalue("file_store")
        store.ensure_bucket("data")
        return store, "data"
    return request.getfixturevalue("s3_store"), request.getfixturevalue("bucket")


def test_put_get_stat_delete(store_and_bucket: tuple[ObjectStore, str]) -> None:
    store, bucket = store_and_bucket
    info = store.put(bucket, "a/b.txt", b"hello")
    assert info.size == 5 and info.etag == hashlib.md5(b"hello").hexdigest()
    assert store.get(bucket, "a/b.txt") == b"hello"
    stat = store.stat(bucket, "a/b.txt")
    assert stat is not None and (stat.size, stat.etag) == (5, info.etag)
    store.delete(bucket, "a/b.txt")
    assert store.stat(bucket, "a/b.txt") is None
    with pytest.raises(NoSuchObject, match=r"a/b\.txt"):
        store.get(bucket, "a/b.txt")


def test_list_is_recursive_sorted_and_prefixed(store_and_bucket: tuple[ObjectStore, str]) -> None:
    store, bucket = store_and_bucket
    for key in ["x/2.bin", "x/1.bin", "x/deep/3.bin", "y/4.bin"]:
        store.put(bucket, key, key.encode())
    assert [o.key for o in store.list(bucket, "x/")] == ["x/1.bin", "x/2.bin", "x/deep/3.bin"]
    assert [o.key for o in store.list(bucket, "nothing/")] == []


def test_files_round_trip(store_and_bucket: tuple[ObjectStore, str], tmp_path: Path) -> None:
    store, bucket = store_and_bucket
    source = tmp_path / "in.bin"
    source.write_bytes(b"\x00\x01" * 1000)
    store.put_file(bucket, "k.bin", source)
    store.get_file(bucket, "k.bin", tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == source.read_bytes()


def test_missing_bucket(store_and_bucket: tuple[ObjectStore, str]) -> None:
    store, _ = store_and_bucket
    with pytest.raises(NoSuchBucket, match="nonexistent-bucket"):
        list(store.list("nonexistent-bucket"))


def test_file_store_persists_and_rejects_escaping_keys(tmp_path: Path) -> None:
    FileStore(tmp_path).ensure_bucket("b")
    FileStore(tmp_path).put("b", "k", b"v")
    assert FileStore(tmp_path).get("b", "k") == b"v"  # a new instance: like a restart
    with pytest.raises(NoSuchObject, match="invalid key"):
        FileStore(tmp_path).put("b", "../../etc/x", b"v")


def test_file_store_url_is_a_file_uri(file_store: FileStore) -> None:
    file_store.ensure_bucket("b")
    file_store.put("b", "m/a.mar", b"x")
    assert file_store.url("b", "m/a.mar") == (file_store.root / "b" / "m" / "a.mar").as_uri()


def test_s3_presigned_url_points_at_the_endpoint(s3_store, bucket: str) -> None:
    import urllib.request

    s3_store.put(bucket, "m/a.mar", b"archive")
    url = s3_store.url(bucket, "m/a.mar")
    assert url.startswith(s3_store.settings.endpoint)
    with urllib.request.urlopen(url) as response:
        assert response.read() == b"archive"


def test_s3_uri() -> None:
    assert S3Uri.parse("s3://bucket/a/b/") == S3Uri("bucket", "a/b/")
    assert str(S3Uri("b", "p")) == "s3://b/p"
    with pytest.raises(ValueError, match="s3://BUCKET/PREFIX"):
        S3Uri.parse("/local/path")
