"""Pure helpers of ``refit retrain/jobs/rollback`` (the commands run against a live service in
tests/service/test_retrain.py)."""

from __future__ import annotations

import pytest

from cli.jobs import duration, job_line, previous_version, progress_line
from refit.v1 import refit_pb2 as pb


def model(default: str, *versions: str) -> pb.Model:
    return pb.Model(
        name="m", default_version=default, versions=[pb.ModelVersion(version=v) for v in versions]
    )


@pytest.mark.parametrize(
    ("default", "versions", "previous"),
    [("3", ("1", "2", "3"), "2"), ("2", ("1", "2", "3"), "1"), ("1", ("1", "2"), ""),
     ("", ("1",), "")],
)  # fmt: skip
def test_previous_version(default: str, versions: tuple[str, ...], previous: str) -> None:
    assert previous_version(model(default, *versions)) == previous


def test_progress_line_shows_epoch_bar_loss_accuracy_and_eta() -> None:
    progress = pb.EpochProgress(epoch=2, epochs=5, batch=5, batches=10, loss=0.51234, accuracy=0.8,
                                images_per_second=123.4, eta_seconds=75)  # fmt: skip
    line = progress_line(progress)
    assert line == "epoch 2/5 [##########          ] loss 0.512 acc 0.800 123 img/s ETA 1:15"
    progress.epoch_end, progress.val_accuracy = True, 0.9
    assert progress_line(progress).endswith("val_acc 0.900")


def test_duration_unknown_is_a_question_mark() -> None:
    assert duration(-1) == "?" and duration(float("inf")) == "?" and duration(3600) == "60:00"


def test_job_line_per_state() -> None:
    queued = pb.Job(id="job-1", model="m", state=pb.QUEUED, queue_position=2)
    assert job_line(queued).endswith("QUEUED        (#2 in queue)")
    done = pb.Job(id="job-2", model="m", state=pb.SUCCEEDED, version="4",
                  metrics={"val_accuracy": 0.875}, gate=pb.GateResult(promoted=False))  # fmt: skip
    assert job_line(done).endswith("v4  val_acc 87.5% -> candidate")
    failed = pb.Job(id="job-3", model="m", state=pb.FAILED, error="no images under s3://x/y")
    assert job_line(failed).endswith("no images under s3://x/y")
    waiting = pb.Job(id="job-4", model="m", state=pb.PUBLISHING, version="2",
                     detail="v2 is recorded; waiting for TorchServe")  # fmt: skip
    assert job_line(waiting).endswith("v2  v2 is recorded; waiting for TorchServe")
