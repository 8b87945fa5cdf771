"""A job manager with a scripted runner (tests/trainer/jobs/fakes.py), started and stopped."""

from __future__ import annotations

import pytest

from refit.storage import FileStore
from tests.trainer.jobs.fakes import ScriptedRunner
from trainer.jobs.manager import JobManager
from trainer.jobs.records import (
    JobStore,
)


@pytest.fixture
def jobs(file_store: FileStore) -> JobStore:
    file_store.ensure_bucket("refit")
    return JobStore(file_store, "refit")


@pytest.fixture
def runner() -> ScriptedRunner:
    return ScriptedRunner(fail=("broken",))


@pytest.fixture
def manager(jobs: JobStore, runner: ScriptedRunner):
    manager = JobManager(jobs, runner)
    manager.start()
    yield manager
    runner.release.set()
    manager.stop()
