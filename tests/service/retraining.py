"""Helpers for the retraining tests: the trainer's settings and identity, the Retrain API's
calls, and a trainer run as its own process (to be killed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from local_stack.torchserve import TorchServeProcess
from refit.storage import S3Uri, StorageSettings
from refit.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from refit.v1 import refit_pb2 as pb
from refit.v1 import refit_pb2_grpc
from tests.conftest import MotoServer, free_port, wait_for_port
from trainer.jobs.settings import TrainerSettings

UNKNOWN_JOB = "job-20000101T000000-00000000"  # well formed, never issued
RUN_STATES = ("LOADING_DATA", "TRAINING", "EXPORTING", "PUBLISHING", "SUCCEEDED")


def trainer_identity(moto: MotoServer, bucket: str, dataset: str) -> StorageSettings:
    """The trainer's least-privilege identity for ``bucket``, reading datasets from
    ``dataset``'s bucket (in production: the ``datasets`` bucket)."""
    return moto.identity("trainer", bucket, datasets=S3Uri.parse(dataset).bucket)


def trainer_settings(
    moto: MotoServer, bucket: str, ts: TorchServeProcess, dataset: str
) -> TrainerSettings:
    return TrainerSettings(
        grpc_address="127.0.0.1:0",
        health_address="127.0.0.1:0",
        torchserve_inference=f"127.0.0.1:{ts.ports.grpc_inference}",
        torchserve_management=f"127.0.0.1:{ts.ports.grpc_management}",
        torchserve_keys=ts.keys,
        bucket=bucket,
        device="cpu",
        loader_workers=0,  # tiny datasets: worker processes cost more than they save
        log_every=1,
        storage=trainer_identity(moto, bucket, dataset),
    )


def retrain(api: refit_pb2_grpc.RefitStub, model: str, dataset: str, **fields) -> pb.Job:
    request = pb.RetrainRequest(model=model, dataset_uri=dataset, created_by="tests", **fields)
    return api.Retrain(request, timeout=30)


def watch(api: refit_pb2_grpc.RefitStub, job_id: str, timeout: float = 300) -> list[pb.JobEvent]:
    return list(api.WatchJob(pb.WatchJobRequest(id=job_id), timeout=timeout))


def states(events: list[pb.JobEvent]) -> list[str]:
    names = [pb.JobState.Name(e.job.state) for e in events]
    return [s for i, s in enumerate(names) if i == 0 or names[i - 1] != s]


class TrainerProcess:
    def __init__(
        self, storage: StorageSettings, bucket: str, ts: TorchServeProcess, log: Path
    ) -> None:
        self.port = free_port()
        self.log = log
        self.env = {
            **os.environ,
            **storage.to_env(),
            "REFIT_BUCKET": bucket,
            "REFIT_TRAINER_GRPC_ADDRESS": f"127.0.0.1:{self.port}",
            "REFIT_TRAINER_HEALTH_ADDRESS": f"127.0.0.1:{free_port()}",
            "REFIT_TRAINER_METRICS_ADDRESS": f"127.0.0.1:{free_port()}",
            "REFIT_TORCHSERVE_INFERENCE": f"127.0.0.1:{ts.ports.grpc_inference}",
            "REFIT_TORCHSERVE_MANAGEMENT": f"127.0.0.1:{ts.ports.grpc_management}",
            "REFIT_TORCHSERVE_KEYS": ts.keys,
            "REFIT_TRAINER_DEVICE": "cpu",
            "REFIT_TRAINER_LOADER_WORKERS": "1",  # DataLoader workers next to gRPC threads
            "REFIT_TRAINER_LOG_EVERY": "1",
        }
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("a") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "trainer.server"], env=self.env, stdout=out, stderr=out
            )
        wait_for_port(self.port, timeout=120, process=self.process)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)


def trainer_events(
    stub: trainer_pb2_grpc.TrainerStub, job_id: str, timeout: float = 300
) -> Iterator[pb.JobEvent]:
    """One job's record, then its events until it ends, from the trainer's Subscribe stream
    (the trainer has no per-job watch: each service replica fans this one stream out)."""
    stream = stub.Subscribe(trainer_pb2.SubscribeRequest(), timeout=timeout)
    try:
        active = {job.id: job for job in next(stream).active.jobs}
        if job_id not in active:  # it has ended: its record is all there is
            yield pb.JobEvent(kind="snapshot", job=stub.GetJob(pb.GetJobRequest(id=job_id)))
            return
        yield pb.JobEvent(kind="snapshot", job=active[job_id])
        for message in stream:
            if message.event.job.id == job_id:
                yield message.event
                if message.event.job.state in (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED):
                    return
    finally:
        stream.cancel()
