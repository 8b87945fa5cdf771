"""``S3Store``: MinIO or any S3-protocol server, through the ``minio`` client."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

from refit.identifiers import check_key, check_prefix
from refit.storage.base import (
    AccessDenied,
    InvalidKey,
    NoSuchBucket,
    NoSuchObject,
    ObjectInfo,
    StorageSettings,
    StoreUnreachable,
    check_names,
)


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
        with self._translate("list", bucket, "", check=check_prefix):
            exists = self.client.bucket_exists(bucket)
        if not exists:
            with self._translate("create", bucket, "", check=check_prefix):
                self.client.make_bucket(bucket)

    def put(self, bucket: str, key: str, data: bytes) -> ObjectInfo:
        with self._translate("write", bucket, key):
            result = self.client.put_object(bucket, key, io.BytesIO(data), len(data))
        return ObjectInfo(key, len(data), result.etag or "")

    def put_file(self, bucket: str, key: str, path: Path) -> ObjectInfo:
        with self._translate("write", bucket, key):
            result = self.client.fput_object(bucket, key, str(path))
        return ObjectInfo(key, path.stat().st_size, result.etag or "")

    def get(self, bucket: str, key: str) -> bytes:
        with self._translate("read", bucket, key):
            response = self.client.get_object(bucket, key)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

    def get_file(self, bucket: str, key: str, path: Path) -> None:
        with self._translate("read", bucket, key):
            self.client.fget_object(bucket, key, str(path))

    def stat(self, bucket: str, key: str) -> ObjectInfo | None:
        try:
            with self._translate("read", bucket, key):
                result = self.client.stat_object(bucket, key)
        except NoSuchObject:
            return None
        return ObjectInfo(key, result.size or 0, (result.etag or "").strip('"'))

    def list(self, bucket: str, prefix: str = "") -> Iterator[ObjectInfo]:
        with self._translate("list", bucket, prefix, check=check_prefix):
            for obj in self.client.list_objects(bucket, prefix=prefix, recursive=True):
                if not obj.is_dir:
                    yield ObjectInfo(obj.object_name, obj.size or 0, (obj.etag or "").strip('"'))

    def delete(self, bucket: str, key: str) -> None:
        with self._translate("delete", bucket, key):
            self.client.remove_object(bucket, key)

    def url(self, bucket: str, key: str, expires: timedelta = timedelta(minutes=15)) -> str:
        with self._translate("presign", bucket, key):
            return self.client.presigned_get_object(bucket, key, expires=expires)

    def _translate(
        self, action: str, bucket: str, key: str, check: Callable = check_key
    ) -> _Translate:
        check_names(bucket, key, check)
        return _Translate(action, bucket, key, self.settings)


def _http_client(settings: StorageSettings):
    """minio's own pool, but with timeouts and retries that fit a request path (minio's defaults
    are 5 minutes per connect and per read, with 5 retries)."""
    import certifi
    import urllib3

    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=settings.timeout_s, read=settings.timeout_s),
        maxsize=10,
        cert_reqs="CERT_REQUIRED",
        ca_certs=str(settings.ca_file or certifi.where()),
        retries=urllib3.Retry(
            total=settings.retries, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]
        ),
    )


class _Translate:
    """Turns minio's and urllib3's errors into this module's errors. ``action`` (read, write,
    list, delete...) names the operation in a refusal."""

    INVALID_CODES = frozenset({"InvalidBucketName", "KeyTooLongError", "XMinioInvalidObjectName"})
    BAD_CREDENTIALS = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch"})

    def __init__(self, action: str, bucket: str, key: str, settings: StorageSettings) -> None:
        self.action, self.bucket, self.key = action, bucket, key
        self.endpoint, self.identity = settings.endpoint, settings.access_key

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
            if exc.code == "AccessDenied":
                raise AccessDenied(
                    f"the object store refused to let {self.identity!r} {self.action} "
                    f"s3://{self.bucket}/{self.key} (AccessDenied): that identity's policy does "
                    "not allow it"
                ) from exc
            if exc.code in self.BAD_CREDENTIALS:
                raise AccessDenied(
                    f"the object store at {self.endpoint} refused the credentials of "
                    f"{self.identity!r} ({exc.code}); check MINIO_ACCESS_KEY and MINIO_SECRET_KEY"
                ) from exc
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
