"""``FileStore``: the embedded default, a directory on disk laid out as ``ROOT/BUCKET/KEY``. It
persists across restarts, which an in-memory S3 stand-in (moto) does not."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

from refit.identifiers import check_prefix
from refit.storage.base import (
    InvalidKey,
    NoSuchBucket,
    NoSuchObject,
    ObjectInfo,
    StorageError,
    StoreFull,
    check_names,
)

ETAG_CACHE_SIZE = 100_000  # entries: a few tens of MB at most
ETAG_XATTR = "user.refit.md5"


class FileStore:
    """Embedded backend: ``ROOT/BUCKET/KEY`` on disk.

    Writes are atomic and durable (temp file, fsync, rename): a failed write, a full disk
    included, leaves the previous object as it was. Bucket names and keys follow
    refit.identifiers' rules whatever the caller, so no key leaves its bucket. Each object's MD5
    (its etag) is computed when it is written and kept in an extended attribute, so listing never
    re-reads the files; where the filesystem has no user xattrs, a bounded cache remembers it.
    """

    def __init__(self, root: Path, *, etag_cache_size: int = ETAG_CACHE_SIZE) -> None:
        self.root = Path(root).resolve()
        self._etags = _EtagCache(etag_cache_size)

    def ensure_bucket(self, bucket: str) -> None:
        check_names(bucket, "", check_prefix)
        (self.root / bucket).mkdir(parents=True, exist_ok=True)

    def _bucket_dir(self, bucket: str) -> Path:
        bucket_dir = self.root / bucket
        if not bucket_dir.is_dir():
            raise NoSuchBucket(f"bucket {bucket!r} does not exist under {self.root}")
        return bucket_dir

    def _path(self, bucket: str, key: str) -> Path:
        check_names(bucket, key)
        bucket_dir = self._bucket_dir(bucket)
        path = bucket_dir / key
        if bucket_dir.resolve() not in path.resolve().parents:  # a symlink inside the store
            raise InvalidKey(f"invalid key {key!r}: it leads outside bucket {bucket!r}")
        return path

    def put(self, bucket: str, key: str, data: bytes) -> ObjectInfo:
        path = self._path(bucket, key)
        etag = hashlib.md5(data).hexdigest()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomically(path, data)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFull(
                    f"the embedded object store is out of space ({self.root}); nothing was "
                    f"written to s3://{bucket}/{key}: free disk space and retry"
                ) from exc
            raise StorageError(f"cannot write s3://{bucket}/{key}: {exc.strerror}") from exc
        self._etags.remember(path, etag)
        return ObjectInfo(key, len(data), etag)

    def put_file(self, bucket: str, key: str, path: Path) -> ObjectInfo:
        return self.put(bucket, key, Path(path).read_bytes())

    def get(self, bucket: str, key: str) -> bytes:
        try:
            return self._path(bucket, key).read_bytes()
        except (FileNotFoundError, IsADirectoryError) as exc:
            raise NoSuchObject(f"no object s3://{bucket}/{key}") from exc

    def get_file(self, bucket: str, key: str, path: Path) -> None:
        source = self._path(bucket, key)
        if not source.is_file():
            raise NoSuchObject(f"no object s3://{bucket}/{key}")
        shutil.copyfile(source, path)

    def stat(self, bucket: str, key: str) -> ObjectInfo | None:
        path = self._path(bucket, key)
        return self._info(key, path) if path.is_file() else None

    def list(self, bucket: str, prefix: str = "") -> Iterator[ObjectInfo]:
        check_names(bucket, prefix, check_prefix)
        bucket_dir = self._bucket_dir(bucket)
        # S3 lists in lexicographic key order; so do we.
        keys = []
        for dirpath, _, files in os.walk(bucket_dir):
            for name in files:
                if name.startswith(".tmp-"):
                    continue
                key = Path(dirpath, name).relative_to(bucket_dir).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        for key in sorted(keys):
            try:
                info = self._info(key, bucket_dir / key)
            except FileNotFoundError:
                continue  # deleted since the walk: S3 would not list it either
            yield info

    def delete(self, bucket: str, key: str) -> None:
        path = self._path(bucket, key)
        path.unlink(missing_ok=True)
        self._etags.forget(path)

    def url(self, bucket: str, key: str, expires: timedelta = timedelta(minutes=15)) -> str:
        return self._path(bucket, key).as_uri()

    def _info(self, key: str, path: Path) -> ObjectInfo:
        return ObjectInfo(key, path.stat().st_size, self._etags.etag(path))


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _EtagCache:
    """MD5 per file, valid while the file's size and mtime stay the same. Kept in an xattr on
    the file (survives restarts, costs no memory) and in a bounded LRU (for filesystems without
    user xattrs)."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[str, str]] = OrderedDict()  # path -> stamp, etag
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # each DataLoader worker starts with an empty cache
        return {"max_entries": self.max_entries}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_entries"])

    def remember(self, path: Path, etag: str) -> None:
        stamp = _stamp(path)
        with contextlib.suppress(OSError):  # no user xattrs here: the LRU still remembers
            os.setxattr(path, ETAG_XATTR, f"{stamp} {etag}".encode())
        self._put(str(path), stamp, etag)

    def etag(self, path: Path) -> str:
        stamp = _stamp(path)
        with self._lock:
            cached = self._entries.get(str(path))
            if cached is not None and cached[0] == stamp:
                self._entries.move_to_end(str(path))
                return cached[1]
        etag = _xattr_etag(path, stamp)
        if etag is None:
            with path.open("rb") as f:
                etag = hashlib.file_digest(f, "md5").hexdigest()
            self.remember(path, etag)
        else:
            self._put(str(path), stamp, etag)
        return etag

    def forget(self, path: Path) -> None:
        with self._lock:
            self._entries.pop(str(path), None)

    def __len__(self) -> int:
        return len(self._entries)

    def _put(self, path: str, stamp: str, etag: str) -> None:
        with self._lock:
            self._entries[path] = (stamp, etag)
            self._entries.move_to_end(path)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _xattr_etag(path: Path, stamp: str) -> str | None:
    try:
        value = os.getxattr(path, ETAG_XATTR).decode()
    except OSError:
        return None
    recorded, _, etag = value.partition(" ")
    return etag if recorded == stamp and etag else None
