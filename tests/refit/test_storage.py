"""Both storage backends honour one contract: the embedded FileStore and S3 (a real moto server)."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from refit.errors import to_status
from refit.storage import (
    FileStore,
    InvalidKey,
    NoSuchBucket,
    NoSuchObject,
    ObjectStore,
    S3Store,
    S3Uri,
    StorageSettings,
    StoreFull,
    StoreUnreachable,
)


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


def test_file_store_persists(tmp_path: Path) -> None:
    FileStore(tmp_path).ensure_bucket("bkt")
    FileStore(tmp_path).put("bkt", "k", b"v")
    assert FileStore(tmp_path).get("bkt", "k") == b"v"  # a new instance: like a restart


BAD_KEYS = ["../../etc/x", "a/../../b", "/etc/passwd", "a//b", "./a", "a/./b", "a/..", "", "a\x00b"]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_keys_that_leave_their_place_are_invalid_arguments(
    store_and_bucket: tuple[ObjectStore, str], key: str
) -> None:
    store, bucket = store_and_bucket
    store.put(bucket, "a/b", b"keep")
    calls = [
        lambda: store.put(bucket, key, b"v"),
        lambda: store.get(bucket, key),
        lambda: store.stat(bucket, key),
        lambda: store.delete(bucket, key),
        lambda: store.url(bucket, key),
    ]
    for call in calls:
        with pytest.raises(InvalidKey) as caught:
            call()
        assert to_status(caught.value)[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert store.get(bucket, "a/b") == b"keep"


@pytest.mark.parametrize("prefix", ["../", "/abs", "a//", "a/../b/"])
def test_prefixes_that_leave_their_place_are_invalid(
    store_and_bucket: tuple[ObjectStore, str], prefix: str
) -> None:
    store, bucket = store_and_bucket
    with pytest.raises(InvalidKey):
        list(store.list(bucket, prefix))


@pytest.mark.parametrize("bucket", ["..", "a", "UPPER", "with/slash", "-dash", "192.168.1.1"])
def test_invalid_bucket_names(store_and_bucket: tuple[ObjectStore, str], bucket: str) -> None:
    store, _ = store_and_bucket
    with pytest.raises(InvalidKey, match="bucket"):
        store.get(bucket, "k")
    with pytest.raises(InvalidKey, match="bucket"):
        list(store.list(bucket))


def test_file_store_symlink_out_of_the_bucket_is_refused(file_store: FileStore, tmp_path) -> None:
    file_store.ensure_bucket("bkt")
    (tmp_path / "secret").write_bytes(b"secret")
    (file_store.root / "bkt" / "link").symlink_to(tmp_path / "secret")
    with pytest.raises(InvalidKey, match="outside"):
        file_store.get("bkt", "link")


def test_status_codes_say_whose_fault_it_is() -> None:
    assert to_status(NoSuchObject("x"))[0] == grpc.StatusCode.NOT_FOUND
    assert to_status(NoSuchBucket("x"))[0] == grpc.StatusCode.NOT_FOUND
    assert to_status(InvalidKey("x"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert to_status(StoreUnreachable("x"))[0] == grpc.StatusCode.UNAVAILABLE


def test_file_store_url_is_a_file_uri(file_store: FileStore) -> None:
    file_store.ensure_bucket("bkt")
    file_store.put("bkt", "m/a.mar", b"x")
    assert file_store.url("bkt", "m/a.mar") == (file_store.root / "bkt" / "m" / "a.mar").as_uri()


# --- etags of the embedded store ----------------------------------------------------------------


class HashCounter:
    """Counts MD5 computations (both hashlib entry points the stores use)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        md5, file_digest = hashlib.md5, hashlib.file_digest

        def counted_md5(*args, **kwargs):
            self.calls += 1
            return md5(*args, **kwargs)

        def counted_file_digest(*args, **kwargs):
            self.calls += 1
            return file_digest(*args, **kwargs)

        monkeypatch.setattr(hashlib, "md5", counted_md5)
        monkeypatch.setattr(hashlib, "file_digest", counted_file_digest)


def test_listing_does_not_rehash_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = FileStore(tmp_path)
    store.ensure_bucket("bkt")
    for i in range(20):
        store.put("bkt", f"ds/{i}.bin", bytes([i]) * 1000)
    counter = HashCounter(monkeypatch)
    listed = list(FileStore(tmp_path).list("bkt"))  # a new process: the CLI, a restart
    listed += list(store.list("bkt"))
    assert len(listed) == 40 and counter.calls == 0
    etags = {o.key: o.etag for o in listed}
    assert etags["ds/3.bin"] == hashlib.md5(bytes([3]) * 1000).hexdigest()


def test_changed_files_get_a_fresh_etag(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    store.ensure_bucket("bkt")
    store.put("bkt", "k", b"one")
    path = store.root / "bkt" / "k"
    path.write_bytes(b"three")  # changed behind the store's back
    assert store.stat("bkt", "k").etag == hashlib.md5(b"three").hexdigest()


def test_etag_cache_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.setxattr", _no_xattrs)  # a filesystem without user xattrs
    monkeypatch.setattr("os.getxattr", _no_xattrs)
    store = FileStore(tmp_path, etag_cache_size=8)
    store.ensure_bucket("bkt")
    for i in range(50):
        store.put("bkt", "same-key", str(i).encode())  # overwritten: old entries must go
        store.put("bkt", f"k{i}", b"x")
        list(store.list("bkt"))
    assert len(store._etags) <= 8
    assert store.stat("bkt", "same-key").etag == hashlib.md5(b"49").hexdigest()


def _no_xattrs(*args, **kwargs):
    raise OSError(95, "Operation not supported")


# --- an object store that does not answer -------------------------------------------------------


@pytest.fixture
def silent_server() -> str:
    """Accepts TCP connections and never answers: a hung object store."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def test_s3_calls_time_out(silent_server: str) -> None:
    settings = StorageSettings(
        endpoint=silent_server, access_key="k", secret_key="s", timeout_s=0.3, retries=1
    )
    outcome: list[BaseException | None] = []

    def call() -> None:
        try:
            S3Store(settings).get("bkt", "k")
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    start = time.monotonic()
    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(20)
    assert outcome, "no answer after 20 s: object-store calls have no timeout"
    assert isinstance(outcome[0], StoreUnreachable), outcome
    assert "did not answer in time" in outcome[0].message and "timed out" in outcome[0].message
    assert time.monotonic() - start < 5


def test_storage_settings_from_env() -> None:
    env = {"REFIT_STORAGE_TIMEOUT_S": "2.5", "REFIT_STORAGE_RETRIES": "0"}
    settings = StorageSettings.from_env(env)
    assert (settings.timeout_s, settings.retries) == (2.5, 0)
    assert (StorageSettings().timeout_s, StorageSettings().retries) == (10.0, 2)


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
    assert S3Uri.parse("s3://bucket") == S3Uri("bucket", "")
    with pytest.raises(ValueError, match="s3://BUCKET/PREFIX"):
        S3Uri.parse("/local/path")
    for bad in ("s3://../x", "s3://bucket/../x", "s3://bucket/a\nb", "s3://bucket//x"):
        with pytest.raises(ValueError, match="invalid"):
            S3Uri.parse(bad)


# --- the embedded store's disk fills up ---------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB filesystem (tmpfs), mounted for this test only."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mount_point)]
    try:
        mounted = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("no mount command: cannot build a small filesystem to fill")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({mounted.stderr.strip()}): needs CAP_SYS_ADMIN")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True, timeout=30)


def test_disk_full_is_a_clear_error_and_corrupts_nothing(small_disk: Path) -> None:
    store = FileStore(small_disk)
    store.ensure_bucket("refit")
    store.put("refit", "registry/m/default.json", b'{"version": "1"}')
    with pytest.raises(StoreFull) as caught:
        store.put("refit", "registry/m/default.json", b"x" * (2 << 20))  # twice the disk
    assert to_status(caught.value)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "out of space" in caught.value.message and "nothing was written" in caught.value.message
    assert store.get("refit", "registry/m/default.json") == b'{"version": "1"}'
    assert not [p for p in small_disk.rglob("*") if p.name.startswith(".tmp-")]
    with pytest.raises(StoreFull):
        store.put("refit", "archives/m/new.mar", b"y" * (2 << 20))
    assert store.stat("refit", "archives/m/new.mar") is None  # no half-written object
    store.put("refit", "archives/m/small.mar", b"z" * 1000)  # space is back: writes work
    assert [o.key for o in store.list("refit")] == [
        "archives/m/small.mar",
        "registry/m/default.json",
    ]


def test_a_file_deleted_while_a_listing_is_read_is_left_out(file_store: FileStore) -> None:
    """gc lists while a job deletes its checkpoint: the listing skips it, as S3's would."""
    file_store.ensure_bucket("refit")
    for key in ("checkpoints/a/1.pt", "checkpoints/a/2.pt", "checkpoints/b/1.pt"):
        file_store.put("refit", key, b"x")
    listing = file_store.list("refit", "checkpoints/")
    assert next(listing).key == "checkpoints/a/1.pt"
    file_store.delete("refit", "checkpoints/a/2.pt")
    assert [info.key for info in listing] == ["checkpoints/b/1.pt"]
