"""Job records <-> refit.v1 messages (the trainer's internal API reuses the public ones)."""

from __future__ import annotations

from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from refit.v1 import refit_pb2 as pb
from trainer.jobs.records import JobRecord


def request_to_dict(request: pb.RetrainRequest) -> dict:
    return json_format.MessageToDict(request, preserving_proto_field_name=True)


def job_to_proto(record: JobRecord, queue_position: int = 0) -> pb.Job:
    request = json_format.ParseDict(record.request, pb.RetrainRequest(), ignore_unknown_fields=True)
    return pb.Job(
        id=record.id,
        model=record.model,
        state=pb.JobState.Value(record.state),
        request=request,
        created_at=_timestamp(record.created_at),
        started_at=_timestamp(record.started_at),
        finished_at=_timestamp(record.finished_at),
        error=record.error,
        version=record.version,
        progress=pb.EpochProgress(**record.progress) if record.progress else None,
        gate=pb.GateResult(**record.gate) if record.gate else None,
        metrics={k: float(v) for k, v in record.metrics.items()},
        phase_seconds=record.phase_seconds(),
        queue_position=queue_position,
        attempts=record.attempts,
        detail=record.detail,
    )


def state_names(states: list[int]) -> tuple[str, ...]:
    return tuple(pb.JobState.Name(s) for s in states if s != pb.JOB_STATE_UNSPECIFIED)


def _timestamp(seconds: float) -> Timestamp | None:
    if not seconds:
        return None
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp
