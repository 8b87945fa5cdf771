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

The trainer runs it every ``REFIT_GC_INTERVAL_S``; ``refit gc [--dry-run]`` runs it on demand.
If any record cannot be read, nothing is removed: a record we cannot see may need anything.
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


def find_garbage(store: ObjectStore, bucket: str) -> Garbage:
    registry = Registry(store, bucket)
    records = [record for model in registry.models() for record in registry.versions(model)]
    referenced = {r.archive_key for r in records}
    referenced.update(text for r in records for text in r.lineage.strings())
    # Job records (trainer/jobs/records.py): {"id", "model", "state", ...} under jobs/.
    jobs = [
        json.loads(store.get(bucket, info.key))
        for info in store.list(bucket, "jobs/")
        if info.key.endswith(".json")
    ]
    busy = {job["model"] for job in jobs if job["state"] not in TERMINAL_JOB_STATES}
    ended = {job["id"] for job in jobs if job["state"] in TERMINAL_JOB_STATES}

    garbage = Garbage()
    live_digests = set()
    for info in store.list(bucket, "archives/"):
        model, digest = _model_and_digest(info.key)
        if info.key in referenced or model in busy:
            live_digests.add((model, digest))
        else:
            garbage.archives.append(info.key)
    for info in store.list(bucket, "weights/"):
        model, digest = _model_and_digest(info.key)
        live = info.key in referenced or model in busy or (model, digest) in live_digests
        if not live:
            garbage.weights.append(info.key)
    for info in store.list(bucket, "checkpoints/"):
        if info.key.split("/")[1] in ended:
            garbage.checkpoints.append(info.key)
    return garbage


def collect_garbage(store: ObjectStore, bucket: str, *, dry_run: bool = False) -> Garbage:
    garbage = find_garbage(store, bucket)
    for key in garbage.all():
        if not dry_run:
            store.delete(bucket, key)
        log.info("%s s3://%s/%s", "would remove" if dry_run else "removed", bucket, key)
    return garbage


def _model_and_digest(key: str) -> tuple[str, str]:
    parts = key.split("/")
    return (parts[1] if len(parts) > 2 else ""), parts[-1].split(".", 1)[0]
