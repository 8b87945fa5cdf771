"""The object-store interface every backend implements, its errors, and where objects live
(``StorageSettings``, which opens the configured backend)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Protocol

import grpc

from refit.errors import RefitError
from refit.identifiers import InvalidIdentifier, check_bucket, check_key, check_prefix
from refit.settings import from_env, setting


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


class AccessDenied(StorageError):
    """The store refused this component's credentials, or its policy does not allow the
    operation: not worth retrying; the identity or its policy must change."""

    code = grpc.StatusCode.PERMISSION_DENIED


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

    endpoint: str = setting(
        "MINIO_ENDPOINT",
        "",
        "S3 endpoint, host:port (MinIO or any S3); empty: the embedded store in REFIT_DATA_DIR",
    )
    access_key: str = setting("MINIO_ACCESS_KEY", "", "the store's access key")
    secret_key: str = setting("MINIO_SECRET_KEY", "", "the store's secret key", secret=True)
    secure: bool = setting("MINIO_SECURE", False, "reach the store over HTTPS")
    region: str = setting("MINIO_REGION", "us-east-1", "the store's region")
    ca_file: Path | None = setting(
        "SSL_CERT_FILE",
        None,
        "CA bundle trusted for an HTTPS store; unset: certifi's bundle",
        parse=Path,
    )
    data_dir: Path = setting(
        "REFIT_DATA_DIR",
        Path(".refit"),
        "state of the local stack: the embedded object store, logs, tokens, TorchServe's files",
    )
    # Per connection attempt and per socket read (not per object), then `retries` more tries:
    # a store that hangs costs a request at most about (retries + 1) * timeout_s.
    timeout_s: float = setting(
        "REFIT_STORAGE_TIMEOUT_S", 10.0, "seconds per store connection attempt and socket read"
    )
    retries: int = setting(
        "REFIT_STORAGE_RETRIES", 2, "more tries after a store call fails or times out"
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StorageSettings:
        return from_env(cls, env)

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
        # Imported here: both backends import this module.
        if self.endpoint:
            from refit.storage.s3 import S3Store

            return S3Store(self)
        from refit.storage.files import FileStore

        return FileStore(self.data_dir / "objects")


def check_names(bucket: str, key: str, check: Callable = check_key) -> None:
    try:
        check_bucket(bucket)
        check(key)
    except InvalidIdentifier as exc:
        raise InvalidKey(exc.message) from exc
