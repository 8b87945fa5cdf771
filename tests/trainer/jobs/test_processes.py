"""The pure pieces of a multi-process job: its torchrun command and environment, the config and
result handed across, the progress-event tail and how a rank's failure becomes the job's."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from refit.lineage import Lineage, Parent
from refit.storage import StorageSettings
from trainer.artifacts import TrainResult
from trainer.config import Augmentation, TrainConfig
from trainer.engine import ProgressEvent
from trainer.jobs import processes
from trainer.jobs.processes import EventTail, JobDir, Launch, launch_command, launch_env
from trainer.jobs.records import JobCancelled, JobFailed, JobInterrupted
from trainer.jobs.settings import TrainerSettings

STORAGE = StorageSettings(endpoint="127.0.0.1:9000", access_key="ak", secret_key="sk", retries=5)


def test_command_is_a_standalone_torchrun_of_the_rank_entry_point(tmp_path: Path) -> None:
    command = launch_command(Launch(3), tmp_path)
    assert command[:3] == [sys.executable, "-m", "trainer.jobs.torchrun"]
    torchrun_args = command[3 : command.index("-m", 3)]
    assert "--standalone" in torchrun_args  # its own rendezvous on a free loopback port
    assert torchrun_args[torchrun_args.index("--nproc-per-node") + 1] == "3"
    assert torchrun_args[torchrun_args.index("--max-restarts") + 1] == "0"
    assert command[-3:] == ["-m", "trainer.jobs.worker", str(tmp_path)]


def test_several_nodes_meet_at_a_rendezvous_endpoint(tmp_path: Path) -> None:
    launch = Launch(2, nnodes=3, rdzv_endpoint="node0:29400", rdzv_id="flowers-7")
    args = launch.torchrun_args()
    assert "--standalone" not in args
    pairs = dict(zip(args[::2], args[1::2], strict=True))
    assert pairs["--nnodes"] == "3" and pairs["--rdzv-backend"] == "c10d"
    assert pairs["--rdzv-endpoint"] == "node0:29400" and pairs["--rdzv-id"] == "flowers-7"
    with pytest.raises(ValueError, match="rendezvous endpoint"):
        Launch(2, nnodes=2)
    with pytest.raises(ValueError, match="at least one process"):
        Launch(0)


def test_env_carries_the_store_and_shares_the_cores_between_ranks() -> None:
    env = launch_env(2, STORAGE, base={"PATH": "/bin"}, cpus=8)
    assert env["PATH"] == "/bin" and env["OMP_NUM_THREADS"] == "4"
    assert env["REFIT_TRAINER_PID"] == str(os.getpid())  # torchrun ends with its parent
    assert StorageSettings.from_env(env) == replace(STORAGE, data_dir=Path(".refit").resolve())
    assert launch_env(4, STORAGE, base={}, cpus=2)["OMP_NUM_THREADS"] == "1"
    assert launch_env(2, STORAGE, base={"OMP_NUM_THREADS": "3"}, cpus=8)["OMP_NUM_THREADS"] == "3"


def test_embedded_store_path_is_absolute_for_the_ranks() -> None:
    parent = {"MINIO_ENDPOINT": "elsewhere:9000"}  # the trainer's settings win over its env
    env = launch_env(2, StorageSettings(data_dir=Path("relative/dir")), base=parent, cpus=2)
    assert "MINIO_ENDPOINT" not in env
    assert env["REFIT_DATA_DIR"] == str(Path("relative/dir").resolve())


def test_config_and_result_cross_the_job_dir_unchanged(tmp_path: Path) -> None:
    job_dir = JobDir(tmp_path)
    config = TrainConfig(
        dataset="s3://d/p", out="m", epochs=3, freeze=-1, run_id="job-1", version="2",
        augmentation=Augmentation(crop_scale=(0.5, 1.0), rotation=10.0),
    )  # fmt: skip
    job_dir.write_config(config)
    assert job_dir.read_config() == config
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
    line = json.dumps(processes.event_to_dict(event))
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


def test_processes_per_job_setting() -> None:
    assert TrainerSettings.from_env({}).processes_per_job == 1
    env = {"REFIT_TRAINER_PROCESSES_PER_JOB": "2"}
    assert TrainerSettings.from_env(env).processes_per_job == 2
    with pytest.raises(ValueError, match="REFIT_TRAINER_PROCESSES_PER_JOB"):
        TrainerSettings.from_env({"REFIT_TRAINER_PROCESSES_PER_JOB": "0"})
