"""The private directory a multi-process run's supervisor and ranks share
(trainer/jobs/processes.py, trainer/jobs/worker.py): the config goes in; rank 0 appends progress
events and writes the result; a rank that fails writes why, in the job's own terms. Each file is
written whole (renamed into place) or, for events, one complete JSON line at a time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from refit.errors import RefitError
from trainer.artifacts import TrainResult
from trainer.config import Augmentation, TrainConfig
from trainer.engine import ProgressEvent
from trainer.jobs.records import JobCancelled, JobFailed, JobInterrupted

JOB_ERRORS: dict[str, type[RefitError]] = {
    cls.__name__: cls for cls in (JobCancelled, JobFailed, JobInterrupted)
}


def event_to_dict(event: ProgressEvent) -> dict:
    return asdict(event)


@dataclass(frozen=True)
class JobDir:
    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def events(self) -> Path:
        return self.path / "events.jsonl"

    @property
    def result(self) -> Path:
        return self.path / "result.json"

    def write_config(self, config: TrainConfig) -> None:
        _write_json(self.config, asdict(config))

    def read_config(self) -> TrainConfig:
        fields = json.loads(self.config.read_text())
        aug = fields["augmentation"]
        augmentation = aug and Augmentation(**{**aug, "crop_scale": tuple(aug["crop_scale"])})
        return TrainConfig(**{**fields, "augmentation": augmentation})

    def write_result(self, result: TrainResult) -> None:
        _write_json(self.result, result.to_dict())

    def read_result(self) -> TrainResult | None:
        """None when rank 0 ran on another node."""
        if not self.result.exists():
            return None
        return TrainResult.from_dict(json.loads(self.result.read_text()))

    def write_error(
        self, rank: int, error: RefitError | None, *, detail: str = "", at: float | None = None
    ) -> None:
        """Why ``rank`` stopped: a job error, or (None) an unexpected one described by
        ``detail`` (its traceback is in the log)."""
        kind = type(error).__name__ if error is not None else "internal"
        message = error.message if error is not None else detail
        entry = {"rank": rank, "kind": kind, "message": message, "at": at or time.time()}
        _write_json(self.path / f"error-{rank}.json", entry)

    def failure(self, returncode: int) -> RefitError:
        """The job's error after torchrun exited with ``returncode``: the first rank to fail
        names the cause (the others usually failed because it left)."""
        errors = [json.loads(p.read_text()) for p in self.path.glob("error-*.json")]
        if not errors:
            return JobFailed(
                f"the training processes stopped (torchrun exit code {returncode}) without "
                "saying why; see the trainer log"
            )
        first = min(errors, key=lambda e: e["at"])
        if first["kind"] in JOB_ERRORS:
            return JOB_ERRORS[first["kind"]](first["message"])
        return JobFailed(
            f"internal error on rank {first['rank']} ({first['message']}); its traceback is in "
            "the trainer log"
        )


def _write_json(path: Path, value: object) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(value))
    partial.replace(path)  # readers never see half a file


class EventWriter:
    """Rank 0's progress events, one JSON line each. A rank counts only its own images, and the
    ranks step together, so the job's rate is rank 0's times the number of ranks."""

    def __init__(self, path: Path, world_size: int) -> None:
        self.path, self.world_size = path, world_size

    def __call__(self, event: ProgressEvent) -> None:
        entry = event_to_dict(event)
        entry["images_per_second"] *= self.world_size
        with self.path.open("a") as out:
            out.write(json.dumps(entry) + "\n")


class EventTail:
    """The events appended since the last ``read``; a line still being written waits."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.pending = b""

    def read(self) -> Iterator[ProgressEvent]:
        if not self.path.exists():
            return
        with self.path.open("rb") as events:
            events.seek(self.offset)
            data = events.read()
        self.offset += len(data)
        *lines, self.pending = (self.pending + data).split(b"\n")
        for line in lines:
            yield ProgressEvent(**json.loads(line))
