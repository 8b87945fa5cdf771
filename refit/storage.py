"""The one storage module: every component reads and writes the object store through it.

Two backends behind one interface:
- ``S3Store``: MinIO or any S3-protocol server, through the ``minio`` client.
- ``FileStore``: the embedded default, a directory on disk laid out as ``ROOT/BUCKET/KEY``.
  It persists across restarts, which an in-memory S3 stand-in (moto) does not.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Protocol

import grpc

from refit.errors import RefitError
from refit.identifiers import InvalidIdentifier, check_bucket, check_key, check_prefix


class StorageError(RefitError):
    """Base class of storage failures; ``message`` says what a user can do about it. Unless a
    subclass says otherwise the store itself is at fault (down, slow): UNAVAILABLE, retry."""

    code = grpc.StatusCode.UNAVAILABLE


class StoreUnreachable(StorageError):
    """No answer in time, or no connection: worth retrying."""


class NoSuchObject(StorageError):
    code = grpc.StatusCode.NOT_FOUND


class NoSuchBucket(StorageError):
    code = grpc.StatusCode.NOT_FOUND


class InvalidKey(StorageError):
    """A bucket name or key that breaks refit.identifiers' rules: the caller's mistake."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class StoreFull(StorageError):
    """The embedded store's disk is full; nothing was written."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str  # a key or a prefix; "" for the whole bucket

    @classmethod
    def parse(cls, uri: str) -> S3Uri:
        """``s3://BUCKET/PREFIX``; the bucket and prefix follow refit.identifiers' rules."""
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        if not uri.startswith("s3://") or not bucket:
            raise ValueError(f"expected s3://BUCKET/PREFIX, got {uri!r}")
        try:
            check_bucket(bucket)
            check_prefix(key)
        except InvalidIdentifier as exc:
            raise ValueError(exc.message) from exc
        return cls(bucket, key)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


class ObjectStore(Protocol):
    def ensure_bucket(self, bucket: str) -> None: ...
    def put(self, bucket: str, key: str, data: bytes) -> ObjectInfo: ...
    def put_file(self, bucket: str, key: str, path: Path) -> ObjectInfo: ...
    def get(self, bucket: str, key: str) -> bytes: ...
    def get_file(self, bucket: str, key: str, path: Path) -> None: ...
    def stat(self, bucket: str, key: str) -> ObjectInfo | None: ...
    def list(self, bucket: str, prefix: str = "") -> Iterator[ObjectInfo]: ...
    def delete(self, bucket: str, key: str) -> None: ...
    def url(self, bucket: str, key: str, expires: timedelta = timedelta(minutes=15)) -> str: ...


@dataclass(frozen=True)
class StorageSettings:
    """Where objects live. ``endpoint`` empty means the embedded FileStore under ``data_dir``."""

    endpoint: str = ""
    access_key: str = ""
    secret_key: str = ""
    secure: bool = False
    region: str = "us-east-1"
    data_dir: Path = Path(".refit")
    # Per connection attempt and per socket read (not per object), then `retries` more tries:
    # a store that hangs costs a request at most about (retries + 1) * timeout_s.
    timeout_s: float = 10.0
    retries: int = 2

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> StorageSettings:
        env = dict(os.environ if env is None else env)
        return cls(
            endpoint=env.get("MINIO_ENDPOINT", ""),
            access_key=env.get("MINIO_ACCESS_KEY", ""),
            secret_key=env.get("MINIO_SECRET_KEY", ""),
            secure=env.get("MINIO_SECURE", "false").lower() in ("1", "true", "yes"),
            region=env.get("MINIO_REGION", "us-east-1"),
            data_dir=Path(env.get("REFIT_DATA_DIR", ".refit")),
            timeout_s=float(env.get("REFIT_STORAGE_TIMEOUT_S", cls.timeout_s)),
            retries=int(env.get("REFIT_STORAGE_RETRIES", cls.retries)),
        )

    def to_env(self) -> dict[str, str]:
        """The variables ``from_env`` reads, for a child process (the embedded store's directory
        made absolute, so the child may run anywhere)."""
        env = {
            "REFIT_DATA_DIR": str(self.data_dir.resolve()),
            "REFIT_STORAGE_TIMEOUT_S": str(self.timeout_s),
            "REFIT_STORAGE_RETRIES": str(self.retries),
        }
        if self.endpoint:
            env |= {
                "MINIO_ENDPOINT": self.endpoint,
                "MINIO_ACCESS_KEY": self.access_key,
                "MINIO_SECRET_KEY": self.secret_key,
                "MINIO_SECURE": str(self.secure).lower(),
                "MINIO_REGION": self.region,
            }
        return env

    def open(self) -> ObjectStore:
        if self.endpoint:
            return S3Store(self)
        return FileStore(self.data_dir / "objects")


class S3Store:
    """S3-protocol backend. Creates its ``minio.Minio`` client lazily, so it pickles cheaply."""

    def __init__(self, settings: StorageSettings) -> None:
        self.settings = settings
        self._client = None

    def __getstate__(self) -> dict:
        return {"settings": self.settings, "_client": None}

    @property
    def client(self):
        if self._client is None:
            from minio import Minio

            s = self.settings
            secure = s.secure or s.endpoint.startswith("https://")
            self._client = Minio(
                s.endpoint.removeprefix("http://").removeprefix("https://"),
                access_key=s.access_key or None,
                secret_key=s.secret_key or None,
                secure=secure,
                region=s.region,
                http_client=_http_client(s),
            )
        return self._client

    def ensure_bucket(self, bucket: str) -> None:
        with self._translate(bucket, "", check=check_prefix):
            if not self.client.bucket_exists(bucket):
                self.client.make_bucket(bucket)

    def put(self, bucket: str, key: str, data: bytes) -> ObjectInfo:
        with self._translate(bucket, key):
            result = self.client.put_object(bucket, key, io.BytesIO(data), len(data))
        return ObjectInfo(key, len(data), result.etag or "")

    def put_file(self, bucket: str, key: str, path: Path) -> ObjectInfo:
        with self._translate(bucket, key):
            result = self.client.fput_object(bucket, key, str(path))
        return ObjectInfo(key, path.stat().st_size, result.etag or "")

    def get(self, bucket: str, key: str) -> bytes:
        with self._translate(bucket, key):
            response = self.client.get_object(bucket, key)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

    def get_file(self, bucket: str, key: str, path: Path) -> None:
        with self._translate(bucket, key):
            self.client.fget_object(bucket, key, str(path))

    def stat(self, bucket: str, key: str) -> ObjectInfo | None:
        try:
            with self._translate(bucket, key):
                result = self.client.stat_object(bucket, key)
        except NoSuchObject:
            return None
        return ObjectInfo(key, result.size or 0, (result.etag or "").strip('"'))

    def list(self, bucket: str, prefix: str = "") -> Iterator[ObjectInfo]:
        with self._translate(bucket, prefix, check=check_prefix):
            for obj in self.client.list_objects(bucket, prefix=prefix, recursive=True):
                if not obj.is_dir:
                    yield ObjectInfo(obj.object_name, obj.size or 0, (obj.etag or "").strip('"'))

    def delete(self, bucket: str, key: str) -> None:
        with self._translate(bucket, key):
            self.client.remove_object(bucket, key)

    def url(self, bucket: str, key: str, expires: timedelta = timedelta(minutes=15)) -> str:
        with self._translate(bucket, key):
            return self.client.presigned_get_object(bucket, key, expires=expires)

    def _translate(self, bucket: str, key: str, check: Callable = check_key) -> _Translate:
        _check_names(bucket, key, check)
        return _Translate(bucket, key, self.settings.endpoint)


def _http_client(settings: StorageSettings):
    """minio's own pool, but with timeouts and retries that fit a request path (minio's defaults
    are 5 minutes per connect and per read, with 5 retries)."""
    import certifi
    import urllib3

    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=settings.timeout_s, read=settings.timeout_s),
        maxsize=10,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=urllib3.Retry(
            total=settings.retries, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]
        ),
    )


def _check_names(bucket: str, key: str, check: Callable = check_key) -> None:
    try:
        check_bucket(bucket)
        check(key)
    except InvalidIdentifier as exc:
        raise InvalidKey(exc.message) from exc


class _Translate:
    """Turns minio's and urllib3's errors into this module's errors."""

    INVALID_CODES = frozenset({"InvalidBucketName", "KeyTooLongError", "XMinioInvalidObjectName"})

    def __init__(self, bucket: str, key: str, endpoint: str) -> None:
        self.bucket, self.key, self.endpoint = bucket, key, endpoint

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        from minio.error import S3Error
        from urllib3.exceptions import HTTPError

        if isinstance(exc, S3Error):
            if exc.code == "NoSuchBucket":
                raise NoSuchBucket(f"bucket {self.bucket!r} does not exist") from exc
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                raise NoSuchObject(f"no object s3://{self.bucket}/{self.key}") from exc
            if exc.code in self.INVALID_CODES:
                raise InvalidKey(f"s3://{self.bucket}/{self.key}: {exc.message}") from exc
        if isinstance(exc, HTTPError | ConnectionError | TimeoutError):
            raise StoreUnreachable(
                f"the object store at {self.endpoint} is unreachable or did not answer in time "
                f"({_reason(exc)}); retry shortly"
            ) from exc
        return False


def _reason(exc: BaseException) -> str:
    """urllib3's innermost cause, without the connection object's repr."""
    reason = getattr(exc, "reason", None) or exc
    return str(reason).rsplit(">: ", 1)[-1][:200]


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
        _check_names(bucket, "", check_prefix)
        (self.root / bucket).mkdir(parents=True, exist_ok=True)

    def _bucket_dir(self, bucket: str) -> Path:
        bucket_dir = self.root / bucket
        if not bucket_dir.is_dir():
            raise NoSuchBucket(f"bucket {bucket!r} does not exist under {self.root}")
        return bucket_dir

    def _path(self, bucket: str, key: str) -> Path:
        _check_names(bucket, key)
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
        _check_names(bucket, prefix, check_prefix)
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
            yield self._info(key, bucket_dir / key)

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
