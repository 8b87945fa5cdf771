"""A trainer process killed mid-job (SIGKILL) and started again resumes the job from its last
checkpoint: the job succeeds on its second attempt, without training the checkpointed epoch
again, and publishes one version."""

from __future__ import annotations

import uuid
from pathlib import Path

import grpc
import pytest

from local_stack.torchserve import TorchServeProcess
from refit.registry import Registry
from refit.storage import S3Store
from refit.trainer.v1 import trainer_pb2_grpc
from refit.v1 import refit_pb2 as pb
from tests.conftest import MotoServer
from tests.service.retraining import (
    TrainerProcess,
    trainer_events,
    trainer_identity,
)
from tests.trainer.synthetic import upload_colours

SIZE = 48
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dataset(moto_server: MotoServer) -> str:
    store = S3Store(moto_server.settings)
    bucket = f"data-{uuid.uuid4().hex[:8]}"
    return upload_colours(store, bucket, "colours", train=16, val=8, size=SIZE)


def test_trainer_killed_mid_job_resumes_from_its_checkpoint(
    moto_server: MotoServer, torchserve: TorchServeProcess, dataset: str, tmp_path: Path
) -> None:
    bucket = f"kill-{uuid.uuid4().hex[:8]}"
    storage = trainer_identity(moto_server, bucket, dataset)
    trainer = TrainerProcess(storage, bucket, torchserve, tmp_path / "trainer.log")
    hp = pb.Hyperparameters(epochs=3, batch_size=16, lr=3e-3, crop_size=SIZE)
    trainer.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{trainer.port}") as channel:
            stub = trainer_pb2_grpc.TrainerStub(channel)
            job = stub.Submit(pb.RetrainRequest(model="killme", dataset_uri=dataset,
                                                hyperparameters=hp), timeout=30)  # fmt: skip
            for event in trainer_events(stub, job.id):
                if event.job.progress.epoch_end and event.job.progress.epoch == 1:
                    break  # epoch 1 is checkpointed
        trainer.kill()
        trainer.start()
        with grpc.insecure_channel(f"127.0.0.1:{trainer.port}") as channel:
            stub = trainer_pb2_grpc.TrainerStub(channel)
            events = list(trainer_events(stub, job.id))
    finally:
        trainer.stop()
    final = events[-1].job
    assert final.state == pb.SUCCEEDED, (final.error, trainer.log.read_text()[-3000:])
    assert final.attempts == 2 and final.version == "1"
    progress = [e.job.progress for e in events if e.kind == "progress"]
    trained = {p.epoch for p in progress if p.epoch_end}
    assert trained <= {2, 3} and 3 in trained  # epoch 1 came from the checkpoint
    versions = Registry(S3Store(moto_server.settings), bucket).versions("killme")
    assert [(v.version, v.lineage.job_id) for v in versions] == [("1", job.id)]
