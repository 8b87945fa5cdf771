"""What a training error means for its job: cancelled, failed (the user can act on the reason),
interrupted (the object store did not answer: run again from the checkpoint), or unexpected.

One mapping for both ways a job trains: in the trainer process, and in each rank of a
multi-process job (trainer/jobs/worker.py), whose verdict the trainer then raises as its own.
"""

from __future__ import annotations

from refit.errors import RefitError
from refit.registry import RegistryError
from refit.storage import AccessDenied, NoSuchBucket, NoSuchObject, StorageError
from trainer.jobs.records import JobCancelled, JobFailed, JobInterrupted


def training_error(exc: BaseException) -> RefitError | None:
    """The job error ``exc`` stands for; None for an unexpected one (an internal error)."""
    from trainer.backbones import BackboneError
    from trainer.data import DatasetError
    from trainer.engine import TrainingCancelled

    if isinstance(exc, TrainingCancelled):
        return JobCancelled(exc.message)
    if is_outage(exc):
        return JobInterrupted(f"the object store did not answer: {describe(exc)}")
    if isinstance(exc, BackboneError | DatasetError | StorageError | RegistryError):
        return JobFailed(exc.message)
    if isinstance(exc, ValueError):
        return JobFailed(str(exc))
    return None


def is_outage(exc: BaseException) -> bool:
    """The object store did not answer (connection refused or reset, timeouts, 5xx, reads that
    ran out of retries): worth running the job again later, unlike a refusal (the identity's
    policy) or a missing key."""
    from trainer.data.errors import ReadFailed
    from trainer.data.retry import is_transient

    if isinstance(exc, NoSuchObject | NoSuchBucket | AccessDenied):
        return False
    return isinstance(exc, ReadFailed | StorageError) or is_transient(exc)


def is_store_error(exc: BaseException) -> bool:
    from minio.error import MinioException
    from urllib3.exceptions import HTTPError

    return isinstance(exc, MinioException | HTTPError | OSError)


def describe(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    return f"{code}: {exc}" if isinstance(code, str) else f"{type(exc).__name__}: {exc}"
