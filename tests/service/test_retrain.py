"""Retraining end to end: the service, a trainer, a real TorchServe and the policed S3 stand-in,
the service and the trainer each under its own identity with the policy minio-init ships
(deploy/containers/minio_init.py), as in production.

One model (``colours``) goes through three jobs in order: a deliberately poor first version
(promoted: nothing to compare with), a good one (promoted by the gate while Predict traffic
flows), a poor one again (stays a candidate). Then defaults, deletion, listing, each job's
checkpoint deleted, cancellation, one active job per model, `refit gc` with the trainer's
identity, and a trainer process killed mid-job and restarted.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import grpc
import numpy as np
import pytest

import cli as refit_cli
from local_stack.torchserve import TorchServeProcess
from refit.registry import Batching, Registry
from refit.storage import S3Store, S3Uri, StorageSettings
from refit.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from refit.v1 import refit_pb2 as pb
from refit.v1 import refit_pb2_grpc
from service.server import RefitServer
from tests.conftest import MotoServer, free_port, wait_for_port
from tests.service.conftest import ADMIN_TOKEN, connect, service_settings, start_service
from tests.trainer.synthetic import CLASS_NAMES, colour_image, png_bytes, upload_colours
from trainer.jobs.settings import TrainerSettings
from trainer.server import TrainerServer, build_server

SIZE = 48
GOOD = pb.Hyperparameters(epochs=3, batch_size=16, lr=3e-3, crop_size=SIZE)
POOR = pb.Hyperparameters(epochs=1, batch_size=16, lr=1e-9, crop_size=SIZE, seed=7)
UNKNOWN_JOB = "job-20000101T000000-00000000"  # well formed, never issued
RUN_STATES = ("LOADING_DATA", "TRAINING", "EXPORTING", "PUBLISHING", "SUCCEEDED")
pytestmark = pytest.mark.integration


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


@pytest.fixture(scope="module")
def dataset(moto_server: MotoServer) -> str:
    store = S3Store(moto_server.settings)
    bucket = f"data-{uuid.uuid4().hex[:8]}"
    return upload_colours(store, bucket, "colours", train=16, val=8, size=SIZE)


@pytest.fixture(scope="module")
def trainer(
    moto_server: MotoServer, refit_bucket: str, torchserve: TorchServeProcess, dataset: str
) -> Iterator[TrainerServer]:
    server = build_server(trainer_settings(moto_server, refit_bucket, torchserve, dataset))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def retrain_service(
    moto_server: MotoServer,
    refit_bucket: str,
    torchserve: TorchServeProcess,
    trainer: TrainerServer,
) -> Iterator[RefitServer]:
    settings = service_settings(
        moto_server, refit_bucket, torchserve, trainer_address=f"127.0.0.1:{trainer.port}"
    )
    refit = start_service(settings)
    yield refit
    refit.stop()


@pytest.fixture(scope="module")
def api(retrain_service: RefitServer) -> Iterator[refit_pb2_grpc.RefitStub]:
    with connect(retrain_service.port) as channel:
        yield refit_pb2_grpc.RefitStub(channel)


@pytest.fixture(scope="module")
def held_out() -> list[tuple[bytes, str]]:
    rng = np.random.default_rng(1234)  # not the upload's seed: images no job trained on
    return [
        (png_bytes(colour_image(label, rng, SIZE)), CLASS_NAMES[label])
        for label in list(range(len(CLASS_NAMES))) * 3
    ]


def retrain(api: refit_pb2_grpc.RefitStub, model: str, dataset: str, **fields) -> pb.Job:
    request = pb.RetrainRequest(model=model, dataset_uri=dataset, created_by="tests", **fields)
    return api.Retrain(request, timeout=30)


def watch(api: refit_pb2_grpc.RefitStub, job_id: str, timeout: float = 300) -> list[pb.JobEvent]:
    return list(api.WatchJob(pb.WatchJobRequest(id=job_id), timeout=timeout))


def accuracy(api, model: str, images: list[tuple[bytes, str]], version: str = "") -> float:
    hits = 0
    for image, label in images:
        request = pb.PredictRequest(image=image, model=model, version=version)
        answer = api.Predict(request, timeout=30)
        hits += answer.predictions[0].label == label
    return hits / len(images)


def states(events: list[pb.JobEvent]) -> list[str]:
    names = [pb.JobState.Name(e.job.state) for e in events]
    return [s for i, s in enumerate(names) if i == 0 or names[i - 1] != s]


# --- one model through three jobs -----------------------------------------------------------------


@pytest.fixture(scope="module")
def first(api, dataset: str) -> pb.Job:
    job = retrain(api, "colours", dataset, hyperparameters=POOR)
    events = watch(api, job.id)
    assert events[-1].job.state == pb.SUCCEEDED, events[-1].job.error
    return events[-1].job


def test_retrain_is_queued_then_runs_through_every_state(api, dataset: str, first) -> None:
    assert first.version == "1" and first.gate.promoted
    assert first.gate.reason == "first version with a default"
    assert set(first.phase_seconds) == {"queue", "data", "train", "export", "publish"}
    assert first.request.created_by == "tests" and first.attempts == 1
    model = api.GetModel(pb.GetModelRequest(name="colours"), timeout=10)
    assert model.default_version == "1"
    lineage = model.versions[0].lineage
    assert lineage.dataset_uri == dataset and lineage.job_id == first.id
    assert len(lineage.dataset_digest) == 64 and lineage.created_by == "tests"
    assert lineage.hyperparameters["epochs"] == "1"


@pytest.fixture(scope="module")
def second(api, dataset: str, first, held_out) -> tuple[pb.Job, list[pb.JobEvent], list]:
    """The good job, with Predict traffic on the model's default the whole time."""
    stop, answers = threading.Event(), []

    def traffic() -> None:
        image = held_out[0][0]
        while not stop.is_set():
            try:
                reply = api.Predict(pb.PredictRequest(image=image, model="colours"), timeout=30)
                answers.append(reply.version)
            except grpc.RpcError as exc:
                answers.append(exc)
            time.sleep(0.05)  # steady traffic that leaves the 2 CPUs to training

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        job = retrain(api, "colours", dataset, hyperparameters=GOOD)
        assert job.state == pb.QUEUED
        events = watch(api, job.id)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (not answers or answers[-1] != "2"):
            time.sleep(0.1)
    finally:
        stop.set()
        thread.join()
    return events[-1].job, events, answers


def test_watch_reports_states_and_epochs(second) -> None:
    job, events, _ = second
    assert job.state == pb.SUCCEEDED, job.error
    assert [s for s in states(events) if s in RUN_STATES] == list(RUN_STATES)
    epochs = [e.job.progress for e in events if e.kind == "progress" and e.job.progress.epoch_end]
    assert [p.epoch for p in epochs] == [1, 2, 3] and all(p.epochs == 3 for p in epochs)
    assert all(p.loss > 0 and p.images_per_second > 0 for p in epochs)
    assert epochs[0].eta_seconds > 0 and epochs[-1].eta_seconds == 0
    assert max(p.val_accuracy for p in epochs) == pytest.approx(job.metrics["val_accuracy"])


def test_better_version_is_promoted_and_predicts_well(api, second, held_out) -> None:
    job, _, _ = second
    assert job.version == "2" and job.gate.promoted, job.gate.reason
    assert job.gate.baseline_version == "1" and job.gate.baseline_evaluated
    assert job.gate.candidate_accuracy > job.gate.baseline_accuracy
    assert api.GetModel(pb.GetModelRequest(name="colours"), timeout=10).default_version == "2"
    assert accuracy(api, "colours", held_out) >= 0.7  # chance is 0.25


def test_no_request_failed_during_the_promotion(second) -> None:
    _, _, answers = second
    errors = [a for a in answers if isinstance(a, grpc.RpcError)]
    assert not errors, errors[:3]
    assert answers[0] == "1" and answers[-1] == "2"
    switch = answers.index("2")
    assert set(answers[:switch]) == {"1"} and set(answers[switch:]) == {"2"}


def cli(service: RefitServer, *args: str) -> tuple[int, str]:
    """The refit CLI as an operator runs it: the admin token in REFIT_TOKEN."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), mock.patch.dict(os.environ, {"REFIT_TOKEN": ADMIN_TOKEN}):
        code = refit_cli.main([*args, "--address", f"127.0.0.1:{service.port}"])
    return code, out.getvalue()


@pytest.fixture(scope="module")
def third(api, retrain_service: RefitServer, dataset: str, second) -> tuple[pb.Job, str]:
    """The poor job again, started and watched by ``refit retrain --watch``."""
    code, out = cli(
        retrain_service, "retrain", "--model", "colours", "--dataset", dataset, "--epochs", "1",
        "--lr", "1e-9", "--batch-size", "16", "--crop-size", str(SIZE), "--seed", "7", "--watch",
        "--serving-batch-size", "2", "--max-batch-delay-ms", "20",
    )  # fmt: skip
    assert code == 0, out
    jobs = api.ListJobs(pb.ListJobsRequest(model="colours", limit=1), timeout=10).jobs
    return jobs[0], out


def test_cli_retrain_watch_prints_states_progress_and_verdict(third) -> None:
    job, out = third
    lines = out.splitlines()
    assert lines[0].startswith(f"job {job.id}: colours from s3://")
    for state in ("training", "exporting", "publishing", "succeeded"):
        assert state in lines
    assert any(line.startswith("epoch 1/1 [") and "ETA" in line and "val_acc" in line
               for line in lines)  # fmt: skip
    assert lines[-2].startswith("colours v3: kept as a candidate (val_accuracy")


def test_worse_version_stays_a_candidate(api, second, third, held_out) -> None:
    third, _ = third
    assert third.state == pb.SUCCEEDED, third.error
    assert third.version == "3" and not third.gate.promoted
    # The default was evaluated on the same validation split: it scores what it scored itself.
    assert third.gate.baseline_accuracy == pytest.approx(second[0].metrics["val_accuracy"])
    model = api.GetModel(pb.GetModelRequest(name="colours"), timeout=10)
    assert model.default_version == "2"
    versions = {v.version: v for v in model.versions}
    assert versions["3"].state == "candidate"
    assert (versions["3"].batching.batch_size, versions["3"].batching.max_batch_delay_ms) == (2, 20)
    default = Batching()  # the trainer's, as the request left batching unset
    assert (versions["2"].batching.batch_size, versions["2"].batching.max_batch_delay_ms) == (
        default.batch_size,
        default.max_batch_delay_ms,
    )
    answer = api.Predict(
        pb.PredictRequest(image=held_out[0][0], model="colours", version="3"), timeout=30
    )
    assert answer.version == "3" and answer.predictions[0].label in CLASS_NAMES


def test_cli_versions_rollback_promote_and_jobs(retrain_service: RefitServer, third) -> None:
    code, out = cli(retrain_service, "rollback", "colours")
    assert code == 0 and out.strip() == "colours: default is now v1"
    code, out = cli(retrain_service, "promote", "colours", "2")
    assert code == 0 and out.strip() == "colours: default is now v2"
    code, out = cli(retrain_service, "versions", "colours", "--json")
    listing = json.loads(out)[0]
    assert code == 0 and listing["defaultVersion"] == "2" and len(listing["versions"]) == 3
    code, out = cli(retrain_service, "jobs", "--model", "colours", "--state", "SUCCEEDED")
    assert code == 0 and len(out.splitlines()) == 3 and "v3" in out.splitlines()[0]
    code, out = cli(retrain_service, "job", third[0].id, "--json")
    assert code == 0 and json.loads(out)["gate"]["promoted"] is False
    code, out = cli(retrain_service, "cancel", third[0].id)
    assert code == 1  # already ended: FAILED_PRECONDITION, reported on stderr


def test_rollback_promote_and_delete(api, third, held_out) -> None:
    image = held_out[0][0]
    model = api.SetDefaultVersion(pb.SetDefaultVersionRequest(model="colours", version="1"))
    assert model.default_version == "1"
    assert api.Predict(pb.PredictRequest(image=image, model="colours")).version == "1"
    api.SetDefaultVersion(pb.SetDefaultVersionRequest(model="colours", version="2"))
    assert api.Predict(pb.PredictRequest(image=image, model="colours")).version == "2"

    with pytest.raises(grpc.RpcError) as caught:
        api.DeleteVersion(pb.DeleteVersionRequest(model="colours", version="2"))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    model = api.DeleteVersion(pb.DeleteVersionRequest(model="colours", version="3"))
    assert [v.version for v in model.versions] == ["1", "2"]
    with pytest.raises(grpc.RpcError) as caught:
        api.Predict(pb.PredictRequest(image=image, model="colours", version="3"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as caught:
        api.SetDefaultVersion(pb.SetDefaultVersionRequest(model="colours", version="9"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_list_jobs_filters_by_model_and_state(api, third) -> None:
    jobs = api.ListJobs(pb.ListJobsRequest(model="colours"), timeout=10).jobs
    assert len(jobs) == 3 and [j.version for j in jobs] == ["3", "2", "1"]  # newest first
    done = api.ListJobs(pb.ListJobsRequest(model="colours", states=[pb.SUCCEEDED])).jobs
    assert len(done) == 3
    assert not api.ListJobs(pb.ListJobsRequest(model="colours", states=[pb.FAILED])).jobs
    assert api.GetJob(pb.GetJobRequest(id=jobs[0].id)).id == jobs[0].id


def test_each_published_job_deleted_its_checkpoint(
    api, moto_server: MotoServer, refit_bucket: str, third
) -> None:
    """Each epoch wrote the job's checkpoint; the trainer's identity deleted it once the version
    was published (trainer/jobs/runner.py), as its policy must allow."""
    store = S3Store(moto_server.settings)
    jobs = api.ListJobs(pb.ListJobsRequest(model="colours"), timeout=10).jobs
    assert len(jobs) == 3
    for job in jobs:
        assert not list(store.list(refit_bucket, f"checkpoints/{job.id}/")), job.id


# --- requests that must be refused ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"model": "Bad Name"}, "invalid model name"),
        ({"dataset_uri": "/not/s3"}, "expected s3://BUCKET/PREFIX"),
        ({"base_version": "7"}, "has no version '7'"),
        ({"backbone": "resnet1000"}, "unknown backbone 'resnet1000'"),
        # The trainer's policy reads its own datasets bucket only: another bucket, existing or
        # not, is refused to it.
        ({"dataset_uri": "s3://no-such-bucket/x"}, "trainer may not read s3://no-such-bucket/"),
        ({"hyperparameters": pb.Hyperparameters(epochs=100000)}, "between 1 and 200"),
        ({"hyperparameters": pb.Hyperparameters(freeze=99)}, "freeze must be between -1 and 17"),
    ],
)
def test_bad_retrain_requests_are_refused_at_submit(api, dataset: str, fields: dict,
                                                    fragment: str) -> None:  # fmt: skip
    request = pb.RetrainRequest(**{"model": "refused", "dataset_uri": dataset, **fields})
    with pytest.raises(grpc.RpcError) as caught:
        api.Retrain(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in caught.value.details()
    assert not api.ListJobs(pb.ListJobsRequest(model="refused"), timeout=10).jobs  # not queued


def test_trainer_down_is_unavailable_with_a_hint(
    moto_server: MotoServer, refit_bucket: str, torchserve: TorchServeProcess
) -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    settings = service_settings(moto_server, refit_bucket, torchserve, trainer_address=nowhere)
    refit = start_service(settings, wait_ready=False)
    try:
        with connect(refit.port) as channel:
            stub = refit_pb2_grpc.RefitStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                retrain(stub, "colours", "s3://data/colours")
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert f"trainer at {nowhere} could not take the call" in caught.value.details()
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.WatchJob(pb.WatchJobRequest(id=UNKNOWN_JOB), timeout=10))
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        refit.stop()


def test_unknown_job(api) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        api.GetJob(pb.GetJobRequest(id=UNKNOWN_JOB), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_cancel_mid_training_and_one_active_job_per_model(api, dataset: str, third) -> None:
    slow = pb.Hyperparameters(epochs=30, batch_size=8, lr=1e-3, crop_size=SIZE)
    job = retrain(api, "slow", dataset, hyperparameters=slow)
    with pytest.raises(grpc.RpcError) as caught:
        retrain(api, "slow", dataset, hyperparameters=slow)
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert job.id in caught.value.details()

    stream = api.WatchJob(pb.WatchJobRequest(id=job.id), timeout=300)
    for event in stream:
        if event.job.state == pb.TRAINING and event.job.progress.batch >= 2:
            break
    cancelled = api.CancelJob(pb.CancelJobRequest(id=job.id), timeout=10)
    assert cancelled.id == job.id
    final = [e.job for e in stream][-1]
    assert final.state == pb.CANCELLED and "cancelled" in final.error
    assert final.progress.epoch == 1  # stopped in the first of 30 epochs
    with pytest.raises(grpc.RpcError) as caught:
        api.GetModel(pb.GetModelRequest(name="slow"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND  # nothing was published
    with pytest.raises(grpc.RpcError) as caught:
        api.CancelJob(pb.CancelJobRequest(id=job.id), timeout=10)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_refit_gc_with_the_trainer_identity_removes_what_no_version_needs(
    moto_server: MotoServer, refit_bucket: str, dataset: str, third
) -> None:
    """`refit gc` as an operator runs it in production: the trainer's identity in MINIO_*. v3
    was deleted above (DeleteVersion keeps archives); its archive and weights are garbage."""
    root = S3Store(moto_server.settings)
    versions = Registry(root, refit_bucket).versions("colours")
    assert [v.version for v in versions] == ["1", "2"]
    needed = {v.archive_key for v in versions} | {v.lineage.weights_key for v in versions}
    stored = {o.key for p in ("archives/colours/", "weights/colours/")
              for o in root.list(refit_bucket, p)}  # fmt: skip
    assert stored - needed  # v3's
    env = {**trainer_identity(moto_server, refit_bucket, dataset).to_env(),
           "REFIT_BUCKET": refit_bucket}  # fmt: skip
    out = io.StringIO()
    with contextlib.redirect_stdout(out), mock.patch.dict(os.environ, env):
        code = refit_cli.main(["gc", "--json"])
    assert code == 0, out.getvalue()
    removed = json.loads(out.getvalue())
    assert stored - needed <= {*removed["archives"], *removed["weights"]}
    left = {o.key for p in ("archives/colours/", "weights/colours/")
            for o in root.list(refit_bucket, p)}  # fmt: skip
    assert left == needed


# --- a trainer process killed mid-job -------------------------------------------------------------


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


def test_trainer_killed_mid_job_resumes_from_its_checkpoint(
    moto_server: MotoServer, torchserve: TorchServeProcess, dataset: str, tmp_path: Path, third
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
