"""Garbage collection of the object store: what no record needs any more.

Removed:
- archives (``archives/<model>/<digest>.mar``) that no version record names, and the plain weights
  stored beside each (``weights/<model>/<digest>.pt``) unless a record names those;
- checkpoints (``checkpoints/<job id>/``) of jobs that have ended.

Kept, whatever else holds:
- every key that any version record mentions anywhere, its lineage included (a version trained
  from another keeps pointing at its parent's weights, even after the parent is deleted);
- everything of a model that has a job not ended yet: such a job may have stored its archive and
  be about to record its version;
- checkpoints with no job record (``refit train`` runs resume from them).

The trainer runs it every ``REFIT_GC_INTERVAL_S``, beside the running job; ``refit gc
[--dry-run]`` runs it on demand. If any record cannot be read, nothing is removed: a record we
cannot see may need anything.

Why gc is safe beside a running trainer: it reads in three rounds, each finished before the next
starts: (1) it lists the candidates (archives, weights, checkpoints), (2) it reads the job
records, (3) it reads the version records. It removes only what round 1 listed. Take an object
listed in round 1 that a job wrote: that job's record existed before round 1 (the trainer
stores a job's record before it starts the job), and round 2 finds it. Either the job had not
ended at that read: its model is busy and the object stays; or it had ended, and everything it
recorded was stored before its end (a version record is written before the job's final state),
so round 3 sees its version record, which names its archive and weights. An object written after
round 1 is not a candidate; the next collection judges it. A version published while gc runs, at
any point between or within the rounds, is therefore covered: by round 2 (its job busy) or by
round 3 (its record). Checkpoints: a job whose record has ended never writes or reads one again
(a cancelled queued job never starts: trainer/jobs/manager.py stores its cancel before it
answers), and a resumed job's record has not ended. The order matters: read versions before
jobs and a job that publishes and ends between the two reads looks ended with no version; read
jobs before listing and the archive of a job submitted in between looks like no one's.

Two assumptions. Trained archives are named by the digest of their content, which includes the
run's timings, so a later run never writes a key again that gc listed as garbage. And every
writer records a job first: the trainer does; ``python -m trainer.base_model`` (run once as a
deployment starts) stores an archive then its version with no job, so a collection running at
that very moment could remove that archive.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from refit.registry import Registry
from refit.storage import ObjectStore

log = logging.getLogger(__name__)
TERMINAL_JOB_STATES = ("SUCCEEDED", "FAILED", "CANCELLED")


@dataclass
class Garbage:
    archives: list[str] = field(default_factory=list)
    weights: list[str] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)

    def all(self) -> list[str]:
        return [*self.archives, *self.weights, *self.checkpoints]


@dataclass(frozen=True)
class _Jobs:
    busy: set[str]  # models with a job not ended
    ended: set[str]  # ids of ended jobs


def find_garbage(store: ObjectStore, bucket: str) -> Garbage:
    # The order of these three rounds is what makes gc safe beside the trainer (docstring).
    candidates = Garbage(
        archives=_keys(store, bucket, "archives/"),
        weights=_keys(store, bucket, "weights/"),
        checkpoints=_keys(store, bucket, "checkpoints/"),
    )
    jobs = _read_jobs(store, bucket)
    referenced = _referenced(Registry(store, bucket))

    garbage = Garbage()
    live_digests = set()
    for key in candidates.archives:
        model, digest = _model_and_digest(key)
        if key in referenced or model in jobs.busy:
            live_digests.add((model, digest))
        else:
            garbage.archives.append(key)
    for key in candidates.weights:
        model, digest = _model_and_digest(key)
        live = key in referenced or model in jobs.busy or (model, digest) in live_digests
        if not live:
            garbage.weights.append(key)
    garbage.checkpoints = [k for k in candidates.checkpoints if k.split("/")[1] in jobs.ended]
    return garbage


def collect_garbage(store: ObjectStore, bucket: str, *, dry_run: bool = False) -> Garbage:
    garbage = find_garbage(store, bucket)
    for key in garbage.all():
        if not dry_run:
            store.delete(bucket, key)
        log.info("%s s3://%s/%s", "would remove" if dry_run else "removed", bucket, key)
    return garbage


def _keys(store: ObjectStore, bucket: str, prefix: str) -> list[str]:
    """The whole listing, read now (a listing is lazy: read later, it would see later writes)."""
    return [info.key for info in store.list(bucket, prefix)]


def _read_jobs(store: ObjectStore, bucket: str) -> _Jobs:
    # Job records (trainer/jobs/records.py): {"id", "model", "state", ...} under jobs/.
    jobs = [
        json.loads(store.get(bucket, key))
        for key in _keys(store, bucket, "jobs/")
        if key.endswith(".json")
    ]
    return _Jobs(
        busy={job["model"] for job in jobs if job["state"] not in TERMINAL_JOB_STATES},
        ended={job["id"] for job in jobs if job["state"] in TERMINAL_JOB_STATES},
    )


def _referenced(registry: Registry) -> set[str]:
    """Every key a version record names: its archive, and any string of its lineage."""
    records = [record for model in registry.models() for record in registry.versions(model)]
    referenced = {record.archive_key for record in records}
    referenced.update(text for record in records for text in record.lineage.strings())
    return referenced


def _model_and_digest(key: str) -> tuple[str, str]:
    parts = key.split("/")
    return (parts[1] if len(parts) > 2 else ""), parts[-1].split(".", 1)[0]
