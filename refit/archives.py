"""An archive is checked against its key before TorchServe gets its URL.

Archives are stored content-addressed (``archives/<model>/<sha256>.mar``, refit/registry.py), so
the key says what the content must hash to. An archive runs Python (its handler) inside every
TorchServe worker: one that was changed after it was stored, by anyone who could write to the
store, must never be registered or smoke-tested. ``ArchiveCheck.url`` hashes the object and hands
out its presigned URL only when the hash matches, once per object version (its ETag): a pass that
registers nothing new reads nothing.

What remains: TorchServe fetches the object by that URL moments later, so an identity that may
write archives (only the trainer's, by policy) could swap it in between. The check closes every
other way in: a changed or corrupted object, a record pointing at another model's archive.
"""

from __future__ import annotations

import hashlib
import re
import threading

import grpc

from refit.errors import RefitError
from refit.storage import ObjectStore

ARCHIVE_KEY = re.compile(r"archives/[^/]+/(?P<digest>[0-9a-f]{64})\.mar")


class ArchiveMismatch(RefitError):
    """The archive's content is not what its key names: it is not served."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ArchiveCheck:
    def __init__(self, store: ObjectStore, bucket: str) -> None:
        self.store, self.bucket = store, bucket
        self._checked: dict[str, str] = {}  # key -> the ETag whose content matched
        self._lock = threading.Lock()

    def url(self, key: str) -> str:
        """The presigned URL of the archive at ``key``, once its content matches its key."""
        match = ARCHIVE_KEY.fullmatch(key)
        if match is None:
            raise ArchiveMismatch(
                f"s3://{self.bucket}/{key} is not a content-addressed archive "
                "(archives/MODEL/SHA256.mar): it cannot be checked, so it is not served"
            )
        info = self.store.stat(self.bucket, key)
        etag = info.etag if info is not None else ""
        with self._lock:
            checked = bool(etag) and self._checked.get(key) == etag
        if not checked:
            digest = hashlib.sha256(self.store.get(self.bucket, key)).hexdigest()
            if digest != match["digest"]:
                raise ArchiveMismatch(
                    f"s3://{self.bucket}/{key} holds content whose sha256 is {digest[:12]}..., "
                    "not the one its key names: it was changed after it was stored, so it is "
                    "not served; restore it, or delete this version and retrain"
                )
            with self._lock:
                self._checked[key] = etag
        return self.store.url(self.bucket, key)
