"""What a running job changes through its context."""

from __future__ import annotations

import threading

from tests.trainer.jobs.fakes import jobs_in_store, request, wait_state
from trainer.jobs.context import JobContext
from trainer.jobs.records import (
    SUCCEEDED,
    TRAINING,
)


def test_a_running_job_says_what_it_waits_for(manager, runner) -> None:
    job = manager.submit(request("a"))
    wait_state(manager, job.id, TRAINING)
    events = manager.follow(job.id, lambda: True)
    next(events)
    JobContext(manager, job.id, threading.Event()).detail("waiting for TorchServe")
    kind, record = next(events)
    assert kind == "detail" and record.detail == "waiting for TorchServe"
    assert manager.get(job.id).detail == "waiting for TorchServe"
    assert jobs_in_store(manager)[job.id].detail == "waiting for TorchServe"
    runner.release.set()
    assert wait_state(manager, job.id, SUCCEEDED).detail == ""
