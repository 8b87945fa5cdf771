"""Where refit finds each TorchServe replica's keys (refit/torchserve/keys.py): pure logic on
real files; the keys against a real TorchServe are tested in tests/deploy/test_keeper.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from refit.errors import NotFound
from refit.torchserve.keys import (
    FileKeys,
    KeyRing,
    Keys,
    KeysUnavailable,
    NoKeys,
    StoreKeys,
    key_source,
)
from refit.torchserve.targets import Replica, Targets

REPLICA = Replica("10.0.0.7:7071", "10.0.0.7:7070", "10.0.0.7:7071")
KEY_FILE = {  # TorchServe 0.12's key_file.json
    "management": {"key": "m-1", "expiration time": "2026-12-07T19:41:50.482112254Z"},
    "inference": {"key": "i-1", "expiration time": "2026-12-07T19:41:50.482101888Z"},
    "API": {"key": "api"},
}


def test_keys_parse_torchserve_key_file_and_the_keeper_document():
    assert Keys.parse(json.dumps(KEY_FILE)) == Keys("m-1", "i-1")
    published = {"management": "m-2", "inference": "i-2", "expires": "2026-12-07T20:00:00+00:00"}
    assert Keys.parse(json.dumps(published)) == Keys("m-2", "i-2")


def test_metadata_carries_the_key_of_the_call_kind():
    keys = Keys("m", "i")
    assert keys.metadata("management") == (("authorization", "Bearer m"),)
    assert keys.metadata("inference") == (("authorization", "Bearer i"),)
    assert Keys().metadata("inference") == ()


def test_file_keys_read_each_replica_file(tmp_path: Path):
    path = tmp_path / "key_file.json"
    path.write_text(json.dumps(KEY_FILE))
    assert FileKeys({REPLICA.management: path}).read(REPLICA) == Keys("m-1", "i-1")


def test_a_missing_or_half_written_key_file_is_unavailable(tmp_path: Path):
    path = tmp_path / "key_file.json"
    source = FileKeys({REPLICA.management: path})
    with pytest.raises(KeysUnavailable, match="cannot be read yet"):
        source.read(REPLICA)
    path.write_text('{"management": {"key"')
    with pytest.raises(KeysUnavailable):
        source.read(REPLICA)


def test_store_keys_are_read_by_the_replica_host():
    asked = []

    def get(key: str) -> bytes:
        asked.append(key)
        return json.dumps({"management": "m", "inference": "i"}).encode()

    assert StoreKeys(get).read(REPLICA) == Keys("m", "i")
    assert asked == ["torchserve/keys/10.0.0.7.json"]


def test_store_keys_not_published_yet_are_unavailable():
    def get(key: str) -> bytes:
        raise NotFound(f"no object {key}")

    with pytest.raises(KeysUnavailable, match="its keeper publishes them"):
        StoreKeys(get).read(REPLICA)


def test_key_source_from_the_setting(tmp_path: Path):
    one = Targets.parse("a:10", "a:11")
    two = Targets.parse("a:10,b:10", "a:11,b:11")
    assert isinstance(key_source("", one, None), NoKeys)
    assert isinstance(key_source("store", one, lambda key: b""), StoreKeys)
    files = key_source(f"file:{tmp_path}/1.json,{tmp_path}/2.json", two, None)
    assert files.paths == {"a:11": tmp_path / "1.json", "b:11": tmp_path / "2.json"}
    with pytest.raises(ValueError, match="one per replica"):
        key_source(f"file:{tmp_path}/1.json", two, None)
    with pytest.raises(ValueError, match="one per replica"):  # a DNS name: any number
        key_source(f"file:{tmp_path}/1.json", Targets.parse("dns:///t:10", "dns:///t:11"), None)
    with pytest.raises(ValueError, match="needs an object store"):
        key_source("store", one, None)
    with pytest.raises(ValueError, match="must be"):
        key_source("vault", one, None)


def test_key_ring_reads_once_and_again_on_refresh(tmp_path: Path):
    path = tmp_path / "key_file.json"
    path.write_text(json.dumps(KEY_FILE))
    ring = KeyRing(FileKeys({REPLICA.management: path}))
    assert ring.get(REPLICA) == Keys("m-1", "i-1")
    rotated = {**KEY_FILE, "management": {"key": "m-2", "expiration time": "2026-12-07T20:00Z"}}
    path.write_text(json.dumps(rotated))
    assert ring.get(REPLICA) == Keys("m-1", "i-1")  # cached: no read per call
    assert ring.refresh(REPLICA) is True
    assert ring.get(REPLICA) == Keys("m-2", "i-1")
    assert ring.refresh(REPLICA) is False  # nothing new: not worth a retry
