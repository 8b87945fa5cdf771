"""The chaos run: 8 clients send Predicts for two models through both service replicas while a
retrain runs; in turn the trainer is killed mid-epoch, one TorchServe replica and one service
replica are killed, and the object store is frozen for 30 s. Runs after test_stack.py (file
order), on its stack and its `colours` model. Counted and asserted: no wrong answer; every failed
call is UNAVAILABLE or DEADLINE_EXCEEDED and falls inside a fault's window; the job ends
SUCCEEDED once, with one version; gc leaves no orphaned archive; the stack is whole again within
READY_BOUND_S of each fault. The counts go to the run's figures (docs/reliability.md)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import grpc
import pytest

from deploy.containers.chaos import Call, Faults, Load, Request, Verdict
from deploy.containers.stack import ComposeStack, docker
from refit.v1 import refit_pb2, refit_pb2_grpc
from tests.containers.test_stack import (
    CLASSES,
    COFFEE_LABELS,
    aws,
    colour_image,
    labelled_images,
)

pytestmark = [pytest.mark.containers, pytest.mark.timeout(3600)]

CLIENTS = 8
READY_BOUND_S = 240  # from a fault until every container is healthy and every replica answers
GRACE_S = 15  # after a window: calls begun by then may still fail (their deadline is 10 s)
STORE_FROZEN_S = 30
IMAGES_PER_CLASS = 40
EPOCHS = 40  # long enough that the job is still training through the faults


@pytest.fixture(scope="module")
def admin(stack: ComposeStack) -> Iterator[refit_pb2_grpc.RefitStub]:
    channel = grpc.insecure_channel(stack.address)
    yield refit_pb2_grpc.RefitStub(channel)
    channel.close()


def call(stub_method, request, stack: ComposeStack, timeout: float = 30):
    return stub_method(
        request, metadata=[("authorization", f"Bearer {stack.admin_token}")], timeout=timeout
    )


def colours_versions(admin, stack: ComposeStack) -> dict[str, refit_pb2.ModelVersion]:
    model = call(admin.GetModel, refit_pb2.GetModelRequest(name="colours"), stack)
    return {v.version: v for v in model.versions}


def wait_for(job_id: str, admin, stack: ComposeStack, done, timeout: float) -> refit_pb2.Job:
    deadline = time.monotonic() + timeout
    while True:
        try:
            job = call(admin.GetJob, refit_pb2.GetJobRequest(id=job_id), stack)
            if done(job):
                return job
        except grpc.RpcError:
            pass  # a fault in progress
        assert time.monotonic() < deadline, f"job {job_id}: condition not met in {timeout} s"
        time.sleep(1)


def test_faults_under_load_lose_nothing(stack, admin, coffee_jpeg, tmp_path, figures):
    before = colours_versions(admin, stack)
    assert before, "test_stack.py's retrain publishes the colours model first"
    dataset = labelled_images(tmp_path / "more-colours", IMAGES_PER_CLASS)
    aws(stack, "s3", "cp", "--recursive", "--only-show-errors", "/data",
        "s3://datasets/more-colours", mount=dataset)  # fmt: skip

    red = colour_image(CLASSES["red"])
    requests = [Request("imagenet", coffee_jpeg), Request("colours", red)]
    load = Load(stack.addresses, stack.predict_token, requests, clients=CLIENTS)
    faults = Faults(stack, requests, READY_BOUND_S)
    load.start()
    try:
        job = call(admin.Retrain, refit_pb2.RetrainRequest(
            model="colours", dataset_uri="s3://datasets/more-colours",
            hyperparameters=refit_pb2.Hyperparameters(epochs=EPOCHS, crop_size=64, batch_size=8),
        ), stack)  # fmt: skip
        training = wait_for(
            job.id, admin, stack, lambda j: j.progress.epoch >= 2 and not j.progress.epoch_end,
            timeout=600,
        )  # fmt: skip
        assert training.state == refit_pb2.TRAINING, training
        faults.crash("trainer-cpu")
        faults.crash("torchserve", 1)
        faults.crash("service", 1)
        faults.freeze_store(STORE_FROZEN_S)
        ended = wait_for(job.id, admin, stack, lambda j: j.state in TERMINAL, timeout=1800)
    finally:
        calls = load.stop()

    after = colours_versions(admin, stack)
    new = sorted(set(after) - set(before))
    references = {version: reference(stack, version, red) for version in after}
    verdict = Verdict.judge(calls, faults.done, right(references), GRACE_S)
    record(figures, verdict, ended, new)

    assert ended.state == refit_pb2.SUCCEEDED, (ended.state, ended.error)
    assert ended.attempts >= 2, "the trainer was killed mid-epoch: the job resumed"
    assert new == [ended.version], (new, ended.version)
    assert after[ended.version].lineage.job_id == ended.id
    assert verdict.wrong == [], verdict.wrong[:5]
    assert verdict.bad_status == [], verdict.bad_status[:5]
    assert verdict.outside == [], verdict.outside[:5]
    assert sum(c.code == "OK" for c in calls) > len(calls) * 0.8, "the load barely ran"

    garbage = json.loads(gc(stack))
    assert garbage["dry_run"] is False
    listing = aws(stack, "s3", "ls", "--recursive", "s3://refit/archives/")
    archives = {line.split()[-1] for line in listing.splitlines()}
    models = ("imagenet", "colours")
    referenced = {v.archive_key for m in models for v in versions_of(admin, stack, m)}
    assert archives <= referenced, f"orphaned archives: {archives - referenced}"


TERMINAL = (refit_pb2.SUCCEEDED, refit_pb2.FAILED, refit_pb2.CANCELLED)


def versions_of(admin, stack: ComposeStack, model: str) -> list[refit_pb2.ModelVersion]:
    return list(call(admin.GetModel, refit_pb2.GetModelRequest(name=model), stack).versions)


def reference(stack: ComposeStack, version: str, image: bytes) -> tuple[str, ...]:
    """What ``version`` of colours answers, asked alone after the run (inference is
    deterministic, so every right answer under load is this one)."""
    with grpc.insecure_channel(stack.address) as channel:
        answer = refit_pb2_grpc.RefitStub(channel).Predict(
            refit_pb2.PredictRequest(image=image, model="colours", version=version, top_k=5),
            metadata=[("authorization", f"Bearer {stack.admin_token}")],
            timeout=60,
        )
    return tuple(p.label for p in answer.predictions)


def right(references: dict[str, tuple[str, ...]]):
    def judge(call: Call) -> bool:
        if call.model == "imagenet":
            return call.version == "1" and bool(set(call.labels) & COFFEE_LABELS)
        return references.get(call.version) == call.labels

    return judge


def gc(stack: ComposeStack) -> str:
    """`refit gc --json` in the trainer's container, with the trainer's own identity."""
    return docker("exec", stack.container("trainer-cpu"), "python", "-m", "cli", "gc", "--json")


def record(figures: dict, verdict: Verdict, job: refit_pb2.Job, new: list[str]) -> None:
    ok = sum(c.code == "OK" for c in verdict.calls)
    figures["chaos: calls / answered / wrong"] = (
        f"{len(verdict.calls)} / {ok} / {len(verdict.wrong)}"
    )
    failed = verdict.failed_per_fault()
    overlapping = verdict.calls_per_fault()
    for fault in verdict.faults:
        codes = ", ".join(f"{n} {code}" for code, n in sorted(failed[fault.name].items()))
        ready = f"{fault.recovery_s:.0f} s" if fault.recovery_s is not None else "never"
        figures[f"chaos: {fault.name}"] = (
            f"whole again after {ready}; {overlapping[fault.name]} calls in its window, "
            f"failed: {codes or 'none'}"
        )
    figures["chaos: failures outside windows / other statuses"] = (
        f"{len(verdict.outside)} / {len(verdict.bad_status)}"
    )
    figures["chaos: job"] = (
        f"{refit_pb2.JobState.Name(job.state)} after {job.attempts} attempts, new versions {new}"
    )
