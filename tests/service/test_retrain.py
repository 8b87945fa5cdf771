"""Retraining end to end: the service, a trainer, a real TorchServe and the policed S3 stand-in,
the service and the trainer each under its own identity with the policy minio-init ships
(deploy/containers/minio_init.py), as in production.

One model (``colours``) goes through three jobs in order: a deliberately poor first version
(promoted: nothing to compare with), a good one (promoted by the gate while Predict traffic
flows), a poor one again (stays a candidate). Then defaults, deletion, listing, each job's
checkpoint deleted, cancellation, one active job per model, and `refit gc` with the trainer's
identity. A trainer killed mid-job: test_retrain_restart.py; none at all: test_trainer_down.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from unittest import mock

import grpc
import numpy as np
import pytest

import cli as refit_cli
from local_stack.torchserve import TorchServeProcess
from refit.registry import Batching, Registry
from refit.storage import S3Store
from refit.v1 import refit_pb2 as pb
from refit.v1 import refit_pb2_grpc
from service.server import RefitServer
from tests.conftest import MotoServer
from tests.service.conftest import ADMIN_TOKEN, connect, service_settings, start_service
from tests.service.retraining import (
    RUN_STATES,
    UNKNOWN_JOB,
    retrain,
    states,
    trainer_identity,
    trainer_settings,
    watch,
)
from tests.trainer.synthetic import CLASS_NAMES, colour_image, png_bytes, upload_colours
from trainer.server import TrainerServer, build_server

SIZE = 48
GOOD = pb.Hyperparameters(epochs=3, batch_size=16, lr=3e-3, crop_size=SIZE)
POOR = pb.Hyperparameters(epochs=1, batch_size=16, lr=1e-9, crop_size=SIZE, seed=7)
pytestmark = pytest.mark.integration


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


def accuracy(api, model: str, images: list[tuple[bytes, str]], version: str = "") -> float:
    hits = 0
    for image, label in images:
        request = pb.PredictRequest(image=image, model=model, version=version)
        answer = api.Predict(request, timeout=30)
        hits += answer.predictions[0].label == label
    return hits / len(images)


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
