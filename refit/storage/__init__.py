"""The one storage module: every component reads and writes the object store through it.

Two backends behind one interface (``base.ObjectStore``), chosen by ``StorageSettings.open()``:
- ``S3Store`` (``s3``): MinIO or any S3-protocol server, through the ``minio`` client.
- ``FileStore`` (``files``): the embedded default, a directory on disk laid out as
  ``ROOT/BUCKET/KEY``. It persists across restarts, which an in-memory S3 stand-in (moto) does not.
"""

from refit.storage.base import (
    AccessDenied,
    InvalidKey,
    NoSuchBucket,
    NoSuchObject,
    ObjectInfo,
    ObjectStore,
    S3Uri,
    StorageError,
    StorageSettings,
    StoreFull,
    StoreUnreachable,
)
from refit.storage.files import FileStore
from refit.storage.s3 import S3Store

__all__ = [
    "AccessDenied",
    "FileStore",
    "InvalidKey",
    "NoSuchBucket",
    "NoSuchObject",
    "ObjectInfo",
    "ObjectStore",
    "S3Store",
    "S3Uri",
    "StorageError",
    "StorageSettings",
    "StoreFull",
    "StoreUnreachable",
]
