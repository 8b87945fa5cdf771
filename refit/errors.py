"""Domain errors shared by every component. Each carries the gRPC status code it means and a
message a user can act on; ``service.errors`` maps them to statuses in one place."""

from __future__ import annotations

import grpc


class RefitError(Exception):
    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(RefitError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class PayloadTooLarge(RefitError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class NotFound(RefitError):
    code = grpc.StatusCode.NOT_FOUND


class Unavailable(RefitError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(RefitError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class AlreadyExists(RefitError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(RefitError):
    code = grpc.StatusCode.FAILED_PRECONDITION
