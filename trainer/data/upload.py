"""``refit dataset upload``: copy a local ImageFolder tree to the object store, resumably.

An object already present with the same size and etag is skipped. S3 single-part etags are the
MD5 of the content; a multipart etag (``<md5>-<parts>``) is compared by size only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from refit.storage import ObjectInfo, ObjectStore, S3Uri
from trainer.data.layout import is_image, normalize_prefix
from trainer.data.retry import RetryPolicy, call_with_retry


@dataclass(frozen=True)
class UploadReport:
    uploaded: int
    skipped: int  # already present with the same content
    bytes_uploaded: int
    ignored: tuple[str, ...]  # local files that are not images (not uploaded)


def file_md5(path: Path) -> str:
    h = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def same_content(path: Path, remote: ObjectInfo | None) -> bool:
    if remote is None or remote.size != path.stat().st_size:
        return False
    return "-" in remote.etag or remote.etag == file_md5(path)


def upload_dir(
    store: ObjectStore,
    source: Path,
    dst: S3Uri,
    *,
    jobs: int = 8,
    retry: RetryPolicy | None = None,
    on_upload: Callable[[str], None] | None = None,
) -> UploadReport:
    if not source.is_dir():
        raise FileNotFoundError(f"{source} is not a directory")
    retry = retry or RetryPolicy()
    dst = normalize_prefix(dst)
    store.ensure_bucket(dst.bucket)
    files = sorted(p for p in source.rglob("*") if p.is_file())
    images = [p for p in files if is_image(p.name)]
    ignored = tuple(p.relative_to(source).as_posix() for p in files if not is_image(p.name))
    remote = {o.key: o for o in store.list(dst.bucket, dst.key)}

    def key_of(path: Path) -> str:
        return dst.key + path.relative_to(source).as_posix()

    todo = [p for p in images if not same_content(p, remote.get(key_of(p)))]

    def put(path: Path) -> int:
        key = key_of(path)
        call_with_retry(
            lambda: store.put_file(dst.bucket, key, path), what=f"upload {key}", policy=retry
        )
        if on_upload:
            on_upload(key)
        return path.stat().st_size

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        sizes = list(pool.map(put, todo))
    return UploadReport(len(todo), len(images) - len(todo), sum(sizes), ignored)
