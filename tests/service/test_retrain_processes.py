"""Retraining jobs that run as two processes (torchrun, DDP over gloo on CPU) through the Retrain
API: the service, a trainer with ``processes_per_job=2``, a real TorchServe and a real S3 server
(moto). One job publishes a version that answers Predict; another is cancelled mid-training and
every one of its processes is gone; a trainer killed mid-job takes its processes with it and,
restarted, resumes the job from its checkpoint."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest

from local_stack.torchserve import TorchServeProcess
from refit.registry import Registry
from refit.storage import S3Store
from refit.trainer.v1 import trainer_pb2_grpc
from refit.v1 import refit_pb2 as pb
from refit.v1 import refit_pb2_grpc
from service.server import RefitServer
from tests.conftest import MotoServer
from tests.service.conftest import connect, service_settings, start_service
from tests.service.retraining import (
    RUN_STATES,
    TrainerProcess,
    retrain,
    states,
    trainer_events,
    trainer_identity,
    trainer_settings,
    watch,
)
from tests.trainer.synthetic import CLASS_NAMES, colour_image, png_bytes, upload_colours
from trainer.server import TrainerServer, build_server

SIZE = 32
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dataset(moto_server: MotoServer) -> str:
    store = S3Store(moto_server.settings)
    bucket = f"data-{uuid.uuid4().hex[:8]}"
    return upload_colours(store, bucket, "colours", train=8, val=4, size=SIZE)


@pytest.fixture(scope="module")
def trainer(
    moto_server: MotoServer, refit_bucket: str, torchserve: TorchServeProcess, dataset: str
) -> Iterator[TrainerServer]:
    settings = trainer_settings(moto_server, refit_bucket, torchserve, dataset)
    settings = replace(settings, processes_per_job=2)
    server = build_server(settings)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api(
    moto_server: MotoServer,
    refit_bucket: str,
    torchserve: TorchServeProcess,
    trainer: TrainerServer,
) -> Iterator[refit_pb2_grpc.RefitStub]:
    settings = service_settings(
        moto_server, refit_bucket, torchserve, trainer_address=f"127.0.0.1:{trainer.port}"
    )
    refit: RefitServer = start_service(settings)
    with connect(refit.port) as channel:
        yield refit_pb2_grpc.RefitStub(channel)
    refit.stop()


def job_processes(job_id: str) -> dict[int, str]:
    """pid -> command line of every live process started for ``job_id`` (its job dir is named
    after it): torchrun's agent and one process per rank."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().decode().split("\0")
        except (OSError, ValueError):
            continue  # not a process, or it ended meanwhile
        if any(job_id in arg for arg in argv) and "trainer.jobs.worker" in argv:
            found[int(entry.name)] = " ".join(argv)
    return found


def test_two_process_job_publishes_a_version_that_answers_predict(api, dataset: str) -> None:
    hp = pb.Hyperparameters(epochs=2, batch_size=8, lr=3e-3, crop_size=SIZE)
    job = retrain(api, "duo", dataset, hyperparameters=hp)
    events = watch(api, job.id)
    final = events[-1].job
    assert final.state == pb.SUCCEEDED, final.error
    assert [s for s in states(events) if s in RUN_STATES] == list(RUN_STATES)
    epochs = [e.job.progress for e in events if e.kind == "progress" and e.job.progress.epoch_end]
    assert [p.epoch for p in epochs] == [1, 2] and all(p.images_per_second > 0 for p in epochs)
    assert final.version == "1" and final.gate.promoted

    model = api.GetModel(pb.GetModelRequest(name="duo"), timeout=10)
    lineage = model.versions[0].lineage
    assert lineage.job_id == job.id and lineage.dataset_uri == dataset
    assert lineage.backbone == "efficientnet_lite0" and len(lineage.dataset_digest) == 64
    assert lineage.hyperparameters["epochs"] == "2"
    image = png_bytes(colour_image(0, np.random.default_rng(99), SIZE))
    answer = api.Predict(pb.PredictRequest(image=image, model="duo"), timeout=30)
    assert answer.version == "1" and answer.predictions[0].label in CLASS_NAMES


def test_cancel_stops_every_process_of_a_running_job(api, dataset: str) -> None:
    slow = pb.Hyperparameters(epochs=30, batch_size=2, lr=1e-3, crop_size=SIZE)
    job = retrain(api, "duo-cancel", dataset, hyperparameters=slow)
    stream = api.WatchJob(pb.WatchJobRequest(id=job.id), timeout=300)
    for event in stream:
        if event.job.state == pb.TRAINING and event.job.progress.batch >= 2:
            break
    running = job_processes(job.id)
    ranks = [cmd for cmd in running.values() if "trainer.jobs.torchrun" not in cmd]
    assert len(ranks) == 2, running

    api.CancelJob(pb.CancelJobRequest(id=job.id), timeout=10)
    final = [e.job for e in stream][-1]
    assert final.state == pb.CANCELLED and "cancelled" in final.error
    deadline = time.monotonic() + 10
    while job_processes(job.id) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not job_processes(job.id)  # the agent and both ranks
    with pytest.raises(grpc.RpcError) as caught:
        api.GetModel(pb.GetModelRequest(name="duo-cancel"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND  # nothing was published


def test_trainer_killed_mid_job_takes_its_processes_along_then_resumes(
    moto_server: MotoServer, torchserve: TorchServeProcess, dataset: str, tmp_path: Path
) -> None:
    bucket = f"kill2-{uuid.uuid4().hex[:8]}"
    storage = trainer_identity(moto_server, bucket, dataset)
    trainer = TrainerProcess(storage, bucket, torchserve, tmp_path / "trainer.log")
    trainer.env["REFIT_TRAINER_PROCESSES_PER_JOB"] = "2"
    trainer.env["REFIT_TRAINER_LOADER_WORKERS"] = "0"
    hp = pb.Hyperparameters(epochs=4, batch_size=2, lr=3e-3, crop_size=SIZE)  # 8 steps/epoch
    trainer.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{trainer.port}") as channel:
            stub = trainer_pb2_grpc.TrainerStub(channel)
            job = stub.Submit(pb.RetrainRequest(model="duo-killed", dataset_uri=dataset,
                                                hyperparameters=hp), timeout=30)  # fmt: skip
            for event in trainer_events(stub, job.id):
                if event.job.progress.epoch_end and event.job.progress.epoch == 1:
                    break  # epoch 1 is checkpointed
        assert len(job_processes(job.id)) == 3  # torchrun's agent and two ranks
        trainer.kill()
        deadline = time.monotonic() + 20
        while job_processes(job.id) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not job_processes(job.id)  # nothing trains on without its trainer
        trainer.start()
        with grpc.insecure_channel(f"127.0.0.1:{trainer.port}") as channel:
            stub = trainer_pb2_grpc.TrainerStub(channel)
            events = list(trainer_events(stub, job.id))
    finally:
        trainer.stop()
    final = events[-1].job
    assert final.state == pb.SUCCEEDED, (final.error, trainer.log.read_text()[-3000:])
    assert final.attempts == 2 and final.version == "1"
    trained = {e.job.progress.epoch for e in events if e.kind == "progress"
               and e.job.progress.epoch_end}  # fmt: skip
    assert trained == {2, 3, 4}  # epoch 1 came from the checkpoint
    versions = Registry(S3Store(moto_server.settings), bucket).versions("duo-killed")
    assert [(v.version, v.lineage.job_id) for v in versions] == [("1", job.id)]
