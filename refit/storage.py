"""The one storage module: every component reads and writes the object store through it.

Two backends behind one interface:
- ``S3Store``: MinIO or any S3-protocol server, through the ``minio`` client.
- ``FileStore``: the embedded default, a directory on disk laid out as ``ROOT/BUCKET/KEY``.
  It persists across restarts, which an in-memory S3 stand-in (moto) does not.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from refit.errors import Unavailable


class StorageError(Unavailable):
    """Base class of storage failures; ``message`` says what a user can do about it."""


class NoSuchObject(StorageError):
    pass


class NoSuchBucket(StorageError):
    pass


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
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"expected s3://BUCKET/PREFIX, got {uri!r}")
        return cls(parsed.netloc, parsed.path.lstrip("/"))

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
        )

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
            self._client = Minio(
                s.endpoint.removeprefix("http://").removeprefix("https://"),
                access_key=s.access_key or None,
                secret_key=s.secret_key or None,
                secure=s.secure or s.endpoint.startswith("https://"),
                region=s.region,
            )
        return self._client

    def ensure_bucket(self, bucket: str) -> None:
        if not self.client.bucket_exists(bucket):
            self.client.make_bucket(bucket)

    def put(self, bucket: str, key: str, data: bytes) -> ObjectInfo:
        with _translate(bucket, key):
            result = self.client.put_object(bucket, key, io.BytesIO(data), len(data))
        return ObjectInfo(key, len(data), result.etag or "")

    def put_file(self, bucket: str, key: str, path: Path) -> ObjectInfo:
        with _translate(bucket, key):
            result = self.client.fput_object(bucket, key, str(path))
        return ObjectInfo(key, path.stat().st_size, result.etag or "")

    def get(self, bucket: str, key: str) -> bytes:
        with _translate(bucket, key):
            response = self.client.get_object(bucket, key)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

    def get_file(self, bucket: str, key: str, path: Path) -> None:
        with _translate(bucket, key):
            self.client.fget_object(bucket, key, str(path))

    def stat(self, bucket: str, key: str) -> ObjectInfo | None:
        try:
            with _translate(bucket, key):
                result = self.client.stat_object(bucket, key)
        except NoSuchObject:
            return None
        return ObjectInfo(key, result.size or 0, (result.etag or "").strip('"'))

    def list(self, bucket: str, prefix: str = "") -> Iterator[ObjectInfo]:
        with _translate(bucket, prefix):
            for obj in self.client.list_objects(bucket, prefix=prefix, recursive=True):
                if not obj.is_dir:
                    yield ObjectInfo(obj.object_name, obj.size or 0, (obj.etag or "").strip('"'))

    def delete(self, bucket: str, key: str) -> None:
        with _translate(bucket, key):
            self.client.remove_object(bucket, key)

    def url(self, bucket: str, key: str, expires: timedelta = timedelta(minutes=15)) -> str:
        return self.client.presigned_get_object(bucket, key, expires=expires)


class _translate:
    """Turns minio's S3Error codes into this module's errors."""

    def __init__(self, bucket: str, key: str) -> None:
        self.bucket, self.key = bucket, key

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        from minio.error import S3Error

        if isinstance(exc, S3Error):
            if exc.code == "NoSuchBucket":
                raise NoSuchBucket(f"bucket {self.bucket!r} does not exist") from exc
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                raise NoSuchObject(f"no object s3://{self.bucket}/{self.key}") from exc
        return False


class FileStore:
    """Embedded backend: ``ROOT/BUCKET/KEY`` on disk; writes are atomic (temp file + rename)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self._etags: dict[tuple[str, int, int], str] = {}

    def ensure_bucket(self, bucket: str) -> None:
        (self.root / bucket).mkdir(parents=True, exist_ok=True)

    def _path(self, bucket: str, key: str) -> Path:
        bucket_dir = self.root / bucket
        if not bucket_dir.is_dir():
            raise NoSuchBucket(f"bucket {bucket!r} does not exist under {self.root}")
        path = (bucket_dir / key).resolve()
        if bucket_dir not in path.parents:
            raise NoSuchObject(f"invalid key {key!r}")
        return path

    def put(self, bucket: str, key: str, data: bytes) -> ObjectInfo:
        path = self._path(bucket, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".tmp-", delete=False) as tmp:
            tmp.write(data)
        os.replace(tmp.name, path)
        return ObjectInfo(key, len(data), hashlib.md5(data).hexdigest())

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
        bucket_dir = self.root / bucket
        if not bucket_dir.is_dir():
            raise NoSuchBucket(f"bucket {bucket!r} does not exist under {self.root}")
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
        self._path(bucket, key).unlink(missing_ok=True)

    def url(self, bucket: str, key: str, expires: timedelta = timedelta(minutes=15)) -> str:
        return self._path(bucket, key).as_uri()

    def _info(self, key: str, path: Path) -> ObjectInfo:
        st = path.stat()
        cache_key = (str(path), st.st_size, st.st_mtime_ns)
        etag = self._etags.get(cache_key)
        if etag is None:
            etag = self._etags[cache_key] = hashlib.md5(path.read_bytes()).hexdigest()
        return ObjectInfo(key, st.st_size, etag)
