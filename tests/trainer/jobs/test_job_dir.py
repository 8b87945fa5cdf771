"""The directory a multi-process run's supervisor and ranks share: config, events, result and
each rank's failure cross it unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from refit.lineage import Lineage, Parent
from trainer.artifacts import TrainResult
from trainer.config import Augmentation, TrainConfig
from trainer.engine import ProgressEvent
from trainer.jobs.job_dir import EventTail, JobDir, event_to_dict
from trainer.jobs.records import JobCancelled, JobFailed, JobInterrupted


def test_config_and_result_cross_the_job_dir_unchanged(tmp_path: Path) -> None:
    job_dir = JobDir(tmp_path)
    config = TrainConfig(
        dataset="s3://d/p", out="m", epochs=3, freeze=-1, run_id="job-1", version="2",
        augmentation=Augmentation(crop_scale=(0.5, 1.0), rotation=10.0),
    )  # fmt: skip
    job_dir.write_config(config)
    assert job_dir.read_config() == config
    left_to_the_recipe = TrainConfig(dataset="s3://d/p", out="m")  # each rank completes it
    job_dir.write_config(left_to_the_recipe)
    assert job_dir.read_config() == left_to_the_recipe
    result = TrainResult(
        model="m", version="2", archive_key="archives/m/x.mar", archive_digest="x",
        weights_key="weights/m/x.pt", class_names=["a", "b"], metrics={"val_accuracy": 0.5},
        lineage=Lineage(backbone="resnet18", run_id="job-1", parent=Parent("m", "1", "w/m/1.pt")),
        evaluation={"images": 4},
        history=[{"epoch": 0}],
    )  # fmt: skip
    job_dir.write_result(result)
    assert job_dir.read_result() == result


def test_event_tail_yields_complete_lines_only(tmp_path: Path) -> None:
    event = ProgressEvent("batch", 0, 2, 1, 4, 1.5, 0.25, 30.0, float("inf"))
    job_dir = JobDir(tmp_path)
    tail = EventTail(job_dir.events)
    assert list(tail.read()) == []  # nothing written yet
    line = json.dumps(event_to_dict(event))
    with job_dir.events.open("a") as out:
        out.write(line + "\n" + line[:10])  # the second line is still being written
    assert list(tail.read()) == [event]
    with job_dir.events.open("a") as out:
        out.write(line[10:] + "\n")
    assert list(tail.read()) == [event] and list(tail.read()) == []


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (JobCancelled("training cancelled in epoch 0 at batch 2"), JobCancelled),
        (JobFailed("dataset s3://d/p has no images"), JobFailed),
        (JobInterrupted("the object store did not answer: timeout"), JobInterrupted),
    ],
)
def test_a_ranks_job_error_becomes_the_jobs(tmp_path: Path, error, expected) -> None:
    job_dir = JobDir(tmp_path)
    job_dir.write_error(1, error)
    raised = job_dir.failure(returncode=1)
    assert type(raised) is expected and raised.message == error.message


def test_the_first_rank_to_fail_names_the_cause(tmp_path: Path) -> None:
    job_dir = JobDir(tmp_path)
    job_dir.write_error(1, JobFailed("dataset s3://d/p has no images"), at=10.0)
    job_dir.write_error(0, None, detail="RuntimeError: Connection closed by peer", at=11.0)
    assert job_dir.failure(returncode=1).message == "dataset s3://d/p has no images"


def test_an_unexpected_error_or_a_silent_death_fails_the_job_with_a_pointer(tmp_path) -> None:
    job_dir = JobDir(tmp_path)
    assert "exit code -9" in job_dir.failure(returncode=-9).message
    assert "trainer log" in job_dir.failure(returncode=-9).message
    job_dir.write_error(1, None, detail="KeyError: 'x'")
    failure = job_dir.failure(returncode=1)
    assert type(failure) is JobFailed
    assert failure.message.startswith("internal error on rank 1 (KeyError: 'x')")
