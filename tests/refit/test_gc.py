"""Garbage collection on a real (embedded) object store: what goes, and what must stay."""

from __future__ import annotations

import functools
import itertools
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cli import main as refit_cli
from refit.gc import collect_garbage, find_garbage
from refit.lineage import Lineage, Parent
from refit.registry import Registry, VersionRecord
from refit.storage import FileStore, ObjectInfo
from trainer.jobs.records import (
    EXPORTING,
    PUBLISHING,
    QUEUED,
    SUCCEEDED,
    TRAINING,
    JobRecord,
    JobStore,
)

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


# --- gc beside a running trainer (issue 23) -------------------------------------------------------
# A job of model roses, written step by step exactly as the trainer writes it (trainer/jobs:
# records through JobStore, the version through refit.registry), while gc runs.

JOB = "job-20270101T000000-0000abcd"
ARCHIVE, WEIGHTS = "archives/roses/eee5.mar", "weights/roses/eee5.pt"
CHECKPOINT = f"checkpoints/{JOB}/last.pt"  # trainer.checkpoint.CheckpointStore's key


def job_record(store: FileStore, state: str) -> None:
    JobStore(store, BUCKET).save(JobRecord(JOB, "roses", {"model": "roses"}, state=state))


def starts(store: FileStore) -> None:  # submitted (the record first), started, checkpointed
    job_record(store, QUEUED)
    job_record(store, TRAINING)
    store.put(BUCKET, CHECKPOINT, b"epoch 1")


def exports(store: FileStore) -> None:  # trainer.artifacts.store_artifacts
    job_record(store, EXPORTING)
    store.put(BUCKET, ARCHIVE, b"mar")
    store.put(BUCKET, WEIGHTS, b"pt")


def records(store: FileStore) -> None:  # refit.publish: the version first, then TorchServe
    job_record(store, PUBLISHING)
    lineage = Lineage(weights_key=WEIGHTS, job_id=JOB)
    Registry(store, BUCKET).add(VersionRecord("roses", "1", ARCHIVE, ["r"], lineage=lineage))


def ends(store: FileStore) -> None:  # trainer/jobs/runner.py, then the manager's _finish
    store.delete(BUCKET, CHECKPOINT)
    job_record(store, SUCCEEDED)


def publishes(store: FileStore) -> None:
    records(store)
    ends(store)


LIFE = (starts, exports, publishes)


class Beside(FileStore):
    """A FileStore on which a trainer acts while gc reads: ``at[n]`` runs just before gc's n-th
    read (list, get or stat; 0 is its first), ``after[prefix]`` right after gc's reads under
    that prefix (before its next read elsewhere, or its first removal); what never came runs
    once gc is done."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.at: dict[int, list[Callable[[FileStore], None]]] = {}
        self.after: dict[str, list[Callable[[FileStore], None]]] = {}
        self.reads = 0
        self._last = ""
        self._quiet = False  # the trainer's own reads do not count

    def _read(self, key: str, *, counts: bool = True) -> None:
        if self._quiet:
            return
        done = [p for p in self.after if self._last.startswith(p) and not key.startswith(p)]
        steps = [s for p in done for s in self.after.pop(p)]
        if counts:
            steps += self.at.pop(self.reads, [])
            self.reads += 1
        self._last = key
        self._run(steps)

    def finish(self) -> None:
        steps = [s for p in list(self.after) for s in self.after.pop(p)]
        self._run(steps + [s for n in sorted(self.at) for s in self.at.pop(n)])

    def _run(self, steps: list[Callable[[FileStore], None]]) -> None:
        self._quiet = True
        try:
            for step in steps:
                step(self)
        finally:
            self._quiet = False

    def list(self, bucket: str, prefix: str = "") -> Iterator[ObjectInfo]:
        self._read(prefix)
        return super().list(bucket, prefix)

    def get(self, bucket: str, key: str) -> bytes:
        self._read(key)
        return super().get(bucket, key)

    def stat(self, bucket: str, key: str) -> ObjectInfo | None:
        self._read(key)
        return super().stat(bucket, key)

    def delete(self, bucket: str, key: str) -> None:
        self._read("", counts=False)
        super().delete(bucket, key)


@pytest.fixture
def beside(tmp_path: Path) -> Beside:
    store = Beside(tmp_path / "beside")
    store.ensure_bucket(BUCKET)
    archive(store, "flowers", "aaa1")  # an orphan: gc must still remove it
    return store


def collect_beside(store: Beside) -> set[str]:
    """gc, then the trainer's steps still to come; the keys left."""
    collect_garbage(store, BUCKET)
    store.finish()
    return {info.key for info in FileStore(store.root).list(BUCKET)}


def test_a_job_that_publishes_and_ends_right_after_gc_reads_the_versions_keeps_its_archive(
    beside: Beside,
) -> None:
    starts(beside)
    exports(beside)
    beside.after["registry/"] = [publishes]
    left = collect_beside(beside)
    assert {ARCHIVE, WEIGHTS} <= left, "the version's archive was removed"
    assert "archives/flowers/aaa1.mar" not in left


def test_what_a_job_submitted_right_after_gc_reads_the_jobs_uploads_stays(beside: Beside) -> None:
    beside.after["jobs/"] = [starts, exports]
    left = collect_beside(beside)
    assert {ARCHIVE, WEIGHTS, CHECKPOINT} <= left, "the running job's files were removed"
    assert "archives/flowers/aaa1.mar" not in left


def gc_reads(tmp_path: Path) -> int:
    """How many reads gc makes at most here: with the job's whole life in the store."""
    store = Beside(tmp_path / "count")
    store.ensure_bucket(BUCKET)
    for step in (*LIFE, starts, exports):  # a version, and a job running
        step(store)
    find_garbage(store, BUCKET)
    shutil.rmtree(store.root)
    return store.reads


def test_no_interleaving_of_a_job_with_gc_loses_what_it_needs(tmp_path: Path) -> None:
    """Every way a job's steps can fall between gc's reads (each step just before one of them,
    in order, or after gc): its version keeps its archive and weights, its checkpoint stays
    while it runs, and gc still removes the orphan."""
    lost: dict[tuple[int, ...], list[str]] = {}
    moments = range(gc_reads(tmp_path) + 1)
    for n, when in enumerate(itertools.combinations_with_replacement(moments, len(LIFE))):
        store = Beside(tmp_path / str(n))
        store.ensure_bucket(BUCKET)
        archive(store, "flowers", "aaa1")
        missing: list[str] = []
        for moment, step in zip(when, LIFE, strict=True):
            store.at.setdefault(moment, []).append(
                functools.partial(needs_checkpoint, step, missing)
            )
        left = collect_beside(store)
        missing += sorted({ARCHIVE, WEIGHTS} - left)
        if "archives/flowers/aaa1.mar" in left:
            missing.append("the orphan stayed")
        if missing:
            lost[when] = missing
        shutil.rmtree(store.root)
    assert lost == {}


def needs_checkpoint(step: Callable, missing: list[str], store: FileStore) -> None:
    """Runs a step of the job; every step after the first resumes from the checkpoint."""
    if step is not starts and store.stat(BUCKET, CHECKPOINT) is None:
        missing.append(f"{CHECKPOINT} before {step.__name__}")
    step(store)


def test_checkpoints_of_a_job_that_resumes_while_gc_runs_stay(tmp_path: Path) -> None:
    """A restart interrupted the job (its record says TRAINING); it resumes at any moment of gc
    (QUEUED again, then TRAINING, a new checkpoint): gc never takes its checkpoint."""
    for moment in range(gc_reads(tmp_path) + 1):
        store = Beside(tmp_path / str(moment))
        store.ensure_bucket(BUCKET)
        starts(store)
        store.at[moment] = [starts]  # recover(), then the worker; the runner resumes
        assert CHECKPOINT in collect_beside(store), f"removed when resumed before read {moment}"
