"""What a training error means for its job (trainer/jobs/failures.py): a store that did not
answer interrupts the job (it runs again); a store that refused fails it with the reason."""

from __future__ import annotations

from refit.storage import AccessDenied, StoreUnreachable
from trainer.jobs.failures import is_outage, training_error
from trainer.jobs.records import JobFailed, JobInterrupted


def test_a_refusal_fails_the_job_with_its_reason() -> None:
    refused = AccessDenied("the object store refused to let 'refit-trainer' write s3://refit/x")
    assert not is_outage(refused)  # retrying cannot help: the policy must change
    error = training_error(refused)
    assert isinstance(error, JobFailed) and error.message == refused.message


def test_an_unreachable_store_interrupts_the_job() -> None:
    assert isinstance(training_error(StoreUnreachable("no answer")), JobInterrupted)
