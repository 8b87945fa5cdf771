"""Job records and their durable store: one JSON object per job, ``jobs/<id>.json``.

The trainer is the only writer. Records are rewritten on each state change and epoch, so after a
restart the trainer knows which jobs were queued or running (and resumes them).
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

import grpc

from refit.errors import FailedPrecondition, RefitError
from refit.storage import ObjectStore

QUEUED, LOADING_DATA, TRAINING, EXPORTING, PUBLISHING = (
    "QUEUED",
    "LOADING_DATA",
    "TRAINING",
    "EXPORTING",
    "PUBLISHING",
)
SUCCEEDED, FAILED, CANCELLED = "SUCCEEDED", "FAILED", "CANCELLED"
RUNNING = (LOADING_DATA, TRAINING, EXPORTING, PUBLISHING)
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
STATES = (QUEUED, *RUNNING, *TERMINAL)
# Phase of the timing breakdown -> (state it starts in, state it ends in).
PHASES = {
    "queue": (QUEUED, LOADING_DATA),
    "data": (LOADING_DATA, TRAINING),
    "train": (TRAINING, EXPORTING),
    "export": (EXPORTING, PUBLISHING),
    "publish": (PUBLISHING, SUCCEEDED),
}


class JobCancelled(RefitError):
    """Raised by a runner when the job's cancel flag stopped it."""


class JobFailed(RefitError):
    """Raised by a runner for a failure the user can act on; ``message`` is the reason."""


class JobInterrupted(RefitError):
    """Raised by a runner when a dependency (the object store) failed for now: the job runs
    again from its last checkpoint after a backoff, up to ``max_attempts`` runs."""


class TooLateToCancel(FailedPrecondition):
    pass


class QueueFull(RefitError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


def now() -> float:
    return datetime.now(UTC).timestamp()


JOB_ID = re.compile(r"^job-[0-9]{8}T[0-9]{6}-[0-9a-f]{8}$")


def new_job_id() -> str:
    # Sortable by creation time; the random tail keeps ids unguessable and unique.
    return f"job-{datetime.now(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(4)}"


@dataclass
class JobRecord:
    id: str
    model: str
    request: dict  # the RetrainRequest, proto JSON form
    state: str = QUEUED
    version: str = ""  # pinned when the job starts: a resumed job keeps it
    created_at: float = field(default_factory=now)
    started_at: float = 0.0
    finished_at: float = 0.0
    error: str = ""
    detail: str = ""  # what a running job is doing or waiting for, e.g. TorchServe to return
    progress: dict = field(default_factory=dict)
    gate: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    entered: dict = field(default_factory=dict)  # state -> time it was (last) entered
    attempts: int = 0

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def phase_seconds(self) -> dict[str, float]:
        return {
            phase: self.entered[end] - self.entered[start]
            for phase, (start, end) in PHASES.items()
            if start in self.entered and end in self.entered
        }

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> JobRecord:
        return cls(**json.loads(data))


class JobStore:
    PREFIX = "jobs/"

    def __init__(self, store: ObjectStore, bucket: str) -> None:
        self.store = store
        self.bucket = bucket

    def save(self, record: JobRecord) -> None:
        self.store.put(self.bucket, f"{self.PREFIX}{record.id}.json", record.to_json())

    def load(self, job_id: str) -> JobRecord | None:
        if not JOB_ID.match(job_id):
            return None
        key = f"{self.PREFIX}{job_id}.json"
        if self.store.stat(self.bucket, key) is None:
            return None
        return JobRecord.from_json(self.store.get(self.bucket, key))

    def load_all(self) -> list[JobRecord]:
        records = [
            JobRecord.from_json(self.store.get(self.bucket, info.key))
            for info in self.store.list(self.bucket, self.PREFIX)
            if info.key.endswith(".json")
        ]
        return sorted(records, key=lambda r: (r.created_at, r.id))
