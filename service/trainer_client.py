"""The one module that talks to the trainer process, through its internal gRPC API.

The trainer's own status codes (ALREADY_EXISTS naming the active job, NOT_FOUND...) pass through
unchanged as domain errors; UNAVAILABLE (the trainer unreachable, or its own passing trouble)
keeps the trainer's words, with a hint.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from refit.errors import RefitError, Unavailable
from refit.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from refit.v1 import refit_pb2 as pb


class TrainerError(RefitError):
    """An error the trainer answered with; keeps its status code."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code


class TrainerClient:
    def __init__(self, target: str, *, timeout_s: float = 10.0) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self._channel = grpc.insecure_channel(target)
        self._stub = trainer_pb2_grpc.TrainerStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def submit(self, request: pb.RetrainRequest) -> pb.Job:
        with self._translate():
            return self._stub.Submit(request, timeout=self.timeout_s)

    def get_job(self, job_id: str) -> pb.Job:
        with self._translate():
            return self._stub.GetJob(pb.GetJobRequest(id=job_id), timeout=self.timeout_s)

    def list_jobs(self, request: pb.ListJobsRequest) -> pb.ListJobsResponse:
        with self._translate():
            return self._stub.ListJobs(request, timeout=self.timeout_s)

    def cancel_job(self, job_id: str) -> pb.Job:
        with self._translate():
            return self._stub.CancelJob(pb.CancelJobRequest(id=job_id), timeout=self.timeout_s)

    def subscribe(self) -> grpc.Call:
        """Every active job, then every job's events (iterate it with ``messages``; ``cancel()``
        it to end it). No deadline: the service holds it open for as long as it runs."""
        return self._stub.Subscribe(trainer_pb2.SubscribeRequest())

    def messages(self, call: grpc.Call) -> Iterator[trainer_pb2.SubscribeResponse]:
        """Iterates a stream from ``subscribe``, translating its errors."""
        with self._translate():
            yield from call

    @contextmanager
    def _translate(self) -> Iterator[None]:
        try:
            yield
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
            if code == grpc.StatusCode.UNAVAILABLE:
                # The trainer out of reach, or its own passing trouble (the store, for one):
                # either way nothing was done, and a retry is the remedy.
                raise Unavailable(
                    f"the trainer at {self.target} could not take the call ({details}); "
                    "retry shortly"
                ) from exc
            if code == grpc.StatusCode.CANCELLED:
                raise TrainerError("the subscription was cancelled", code) from exc
            raise TrainerError(details or f"trainer answered {code.name}", code) from exc
