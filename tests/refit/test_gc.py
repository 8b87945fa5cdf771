"""Garbage collection on a real (embedded) object store: what goes, and what must stay."""

from __future__ import annotations

import json

import pytest

from cli import main as refit_cli
from refit.gc import collect_garbage, find_garbage
from refit.lineage import Lineage, Parent
from refit.registry import Registry, VersionRecord
from refit.storage import FileStore

BUCKET = "refit"


def archive(store: FileStore, model: str, digest: str) -> str:
    key = f"archives/{model}/{digest}.mar"
    store.put(BUCKET, key, b"mar")
    store.put(BUCKET, f"weights/{model}/{digest}.pt", b"pt")
    return key


def job(store: FileStore, job_id: str, model: str, state: str) -> None:
    record = {"id": job_id, "model": model, "state": state}
    store.put(BUCKET, f"jobs/{job_id}.json", json.dumps(record).encode())
    store.put(BUCKET, f"checkpoints/{job_id}/last.pt", b"ckpt")


@pytest.fixture
def store(file_store: FileStore) -> FileStore:
    file_store.ensure_bucket(BUCKET)
    registry = Registry(file_store, BUCKET)
    # flowers v1 was deleted (its archive is an orphan), but v2 was trained from it: v2's lineage
    # still names v1's weights, which must stay.
    archive(file_store, "flowers", "aaa1")
    parent = Parent(model="flowers", version="1", weights_key="weights/flowers/aaa1.pt")
    registry.add(VersionRecord("flowers", "2", archive(file_store, "flowers", "bbb2"), ["a"],
                               lineage=Lineage(parent=parent)))  # fmt: skip
    archive(file_store, "flowers", "ccc3")  # a failed publish: no record
    archive(file_store, "busy", "ddd4")  # its job is publishing: the record comes next
    job(file_store, "job-1", "flowers", "SUCCEEDED")
    job(file_store, "job-2", "busy", "PUBLISHING")
    file_store.put(BUCKET, "checkpoints/flowers-0123abcd/last.pt", b"refit train run")
    return file_store


def test_orphans_go_and_everything_needed_stays(store: FileStore) -> None:
    garbage = find_garbage(store, BUCKET)
    assert sorted(garbage.archives) == ["archives/flowers/aaa1.mar", "archives/flowers/ccc3.mar"]
    assert garbage.weights == ["weights/flowers/ccc3.pt"]  # aaa1's weights: v2's lineage
    assert garbage.checkpoints == ["checkpoints/job-1/last.pt"]  # job-2 runs; no job: kept

    collect_garbage(store, BUCKET)
    left = {info.key for info in store.list(BUCKET)}
    assert not left & set(garbage.all())
    assert {"archives/flowers/bbb2.mar", "weights/flowers/bbb2.pt", "weights/flowers/aaa1.pt",
            "archives/busy/ddd4.mar", "checkpoints/job-2/last.pt",
            "checkpoints/flowers-0123abcd/last.pt"} <= left  # fmt: skip
    assert find_garbage(store, BUCKET).all() == []


def test_dry_run_removes_nothing(store: FileStore) -> None:
    before = {info.key for info in store.list(BUCKET)}
    assert len(collect_garbage(store, BUCKET, dry_run=True).all()) == 4
    assert {info.key for info in store.list(BUCKET)} == before


def test_an_unreadable_record_stops_the_collection(store: FileStore) -> None:
    store.put(BUCKET, "registry/other/versions/1.json", b"{broken")
    with pytest.raises(ValueError):
        collect_garbage(store, BUCKET)
    assert store.stat(BUCKET, "archives/flowers/ccc3.mar") is not None


def test_cli(store: FileStore, monkeypatch, capsys) -> None:
    monkeypatch.setenv("REFIT_DATA_DIR", str(store.root.parent))
    monkeypatch.delenv("MINIO_ENDPOINT", raising=False)
    assert refit_cli(["gc", "--dry-run", "--bucket", BUCKET]) == 0
    assert "would remove 2 archives, 1 weights, 1 checkpoints" in capsys.readouterr().out
    assert refit_cli(["gc", "--bucket", BUCKET, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["archives"] == [
        "archives/flowers/aaa1.mar", "archives/flowers/ccc3.mar",
    ]  # fmt: skip
