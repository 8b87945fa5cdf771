"""An archive is checked against the sha256 its key names before TorchServe gets its URL
(refit/archives.py), on a real store."""

from __future__ import annotations

import hashlib

import pytest

from refit.archives import ArchiveCheck, ArchiveMismatch
from refit.registry import Registry
from refit.storage import FileStore, NoSuchObject

ARCHIVE = b"an archive's bytes"
KEY = Registry.archive_key("m", hashlib.sha256(ARCHIVE).hexdigest())


class CountingStore(FileStore):
    """A FileStore that counts whole-object reads."""

    gets = 0

    def get(self, bucket: str, key: str) -> bytes:
        self.gets += 1
        return super().get(bucket, key)


@pytest.fixture
def store(tmp_path) -> CountingStore:
    store = CountingStore(tmp_path / "objects")
    store.ensure_bucket("refit")
    return store


def test_an_archive_that_matches_its_key_gets_its_url(store) -> None:
    store.put("refit", KEY, ARCHIVE)
    assert ArchiveCheck(store, "refit").url(KEY) == store.url("refit", KEY)


def test_an_archive_changed_after_it_was_stored_is_refused(store) -> None:
    store.put("refit", KEY, b"a handler that does something else")
    with pytest.raises(ArchiveMismatch, match="changed after it was stored"):
        ArchiveCheck(store, "refit").url(KEY)


def test_another_models_archive_under_this_key_is_refused(store) -> None:
    other = b"the other model's archive"
    store.put("refit", KEY, other)  # a record pointing at content that is not its own
    with pytest.raises(ArchiveMismatch):
        ArchiveCheck(store, "refit").url(KEY)


def test_a_key_that_names_no_digest_is_refused(store) -> None:
    store.put("refit", "archives/m/latest.mar", ARCHIVE)
    with pytest.raises(ArchiveMismatch, match="not a content-addressed archive"):
        ArchiveCheck(store, "refit").url("archives/m/latest.mar")


def test_a_missing_archive_is_not_found(store) -> None:
    with pytest.raises(NoSuchObject):
        ArchiveCheck(store, "refit").url(KEY)


def test_each_object_version_is_read_once(store) -> None:
    store.put("refit", KEY, ARCHIVE)
    check = ArchiveCheck(store, "refit")
    for _ in range(3):
        check.url(KEY)
    assert store.gets == 1  # a pass that registers nothing new reads nothing
    store.put("refit", KEY, b"swapped")  # a new object version: read and refused
    with pytest.raises(ArchiveMismatch):
        check.url(KEY)
