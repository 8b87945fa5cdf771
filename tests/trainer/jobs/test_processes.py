"""The pure pieces of a multi-process job: its torchrun command and environment."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from refit.storage import StorageSettings
from trainer.jobs.processes import Launch, launch_command, launch_env
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


def test_processes_per_job_setting() -> None:
    assert TrainerSettings.from_env({}).processes_per_job == 1
    env = {"REFIT_TRAINER_PROCESSES_PER_JOB": "2"}
    assert TrainerSettings.from_env(env).processes_per_job == 2
    with pytest.raises(ValueError, match="REFIT_TRAINER_PROCESSES_PER_JOB"):
        TrainerSettings.from_env({"REFIT_TRAINER_PROCESSES_PER_JOB": "0"})
