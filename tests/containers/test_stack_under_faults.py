"""The chaos run (deploy/containers/chaos.py): 8 clients send Predicts for two models through
both service replicas while a retrain runs; in turn the trainer is killed mid-epoch, one
TorchServe replica and one service replica are killed, and the object store is frozen for 30 s.
Runs after test_stack.py (file order), on its stack and its `colours` model. Counted and
asserted: no wrong answer; every failed call is UNAVAILABLE or DEADLINE_EXCEEDED and falls inside
a fault's window; the job ends SUCCEEDED once, with one version; gc leaves no orphaned archive;
the stack is whole again within READY_BOUND_S of each fault. The counts go to the run's figures
(docs/reliability.md, *Faults under load*); bench/chaos.py is the long form."""

from __future__ import annotations

import json

import pytest

from deploy.containers.chaos import Chaos, Outcome, Request, Verdict, colour_dataset, colour_image
from deploy.containers.stack import ComposeStack, docker
from refit.v1 import refit_pb2
from tests.containers.test_stack import CLASSES, COFFEE_LABELS

pytestmark = [pytest.mark.containers, pytest.mark.timeout(3600)]

READY_BOUND_S = 240  # from a fault until every container is healthy and every replica answers
GRACE_S = 15  # after a window: calls begun by then may still fail (a replica's reconnection)
IMAGES_PER_CLASS = 40
EPOCHS = 16  # long enough that the job is still training through the faults (about 14 s each)


def test_faults_under_load_lose_nothing(stack, coffee_jpeg, tmp_path, figures):
    coffee = Request("imagenet", coffee_jpeg, lambda v, labels: v == "1" and coffee_in(labels))
    chaos = Chaos(stack, [coffee, Request("colours", colour_image(CLASSES["red"]))])
    before = versions(chaos, "colours")
    assert before, "test_stack.py's retrain publishes the colours model first"
    dataset = colour_dataset(tmp_path / "more-colours", CLASSES, IMAGES_PER_CLASS)
    stack.aws("s3", "cp", "--recursive", "--only-show-errors", "/data",
              "s3://datasets/more-colours", mount=dataset)  # fmt: skip

    outcome = chaos.run(refit_pb2.RetrainRequest(
        model="colours", dataset_uri="s3://datasets/more-colours",
        hyperparameters=refit_pb2.Hyperparameters(epochs=EPOCHS, crop_size=64, batch_size=8),
    ))  # fmt: skip
    after = versions(chaos, "colours")
    new = sorted(set(after) - set(before))
    verdict = chaos.judge(outcome, GRACE_S)
    record(figures, verdict, outcome, new)

    job = outcome.job
    assert job.state == refit_pb2.SUCCEEDED, (job.state, job.error)
    assert job.attempts >= 2, "the trainer was killed mid-epoch: the job resumed"
    assert new == [job.version], (new, job.version)
    assert after[job.version].lineage.job_id == job.id
    assert verdict.wrong == [], verdict.wrong[:5]
    assert verdict.bad_status == [], verdict.bad_status[:5]
    assert verdict.outside == [], verdict.outside[:5]
    assert all(f.recovery_s is not None and f.recovery_s < READY_BOUND_S for f in outcome.faults)
    answered = sum(c.code == "OK" for c in outcome.calls)
    assert answered > len(outcome.calls) * 0.8, "the load barely ran"

    assert json.loads(gc(stack))["dry_run"] is False
    listing = stack.aws("s3", "ls", "--recursive", "s3://refit/archives/")
    archives = {line.split()[-1] for line in listing.splitlines()}
    models = ("imagenet", "colours")
    referenced = {v.archive_key for m in models for v in versions(chaos, m).values()}
    assert archives <= referenced, f"orphaned archives: {archives - referenced}"


def coffee_in(labels: tuple[str, ...]) -> bool:
    return bool(set(labels) & COFFEE_LABELS)


def versions(chaos: Chaos, model: str) -> dict[str, refit_pb2.ModelVersion]:
    answer = chaos.admin("GetModel", refit_pb2.GetModelRequest(name=model))
    return {v.version: v for v in answer.versions}


def gc(stack: ComposeStack) -> str:
    """`refit gc --json` in the trainer's container, with the trainer's own identity."""
    return docker("exec", stack.container("trainer-cpu"), "python", "-m", "cli", "gc", "--json")


def record(figures: dict, verdict: Verdict, outcome: Outcome, new: list[str]) -> None:
    ok = sum(c.code == "OK" for c in verdict.calls)
    figures["chaos: calls / answered / wrong"] = (
        f"{len(verdict.calls)} / {ok} / {len(verdict.wrong)}"
    )
    figures["chaos: answered in (s)"] = ", ".join(
        f"{name} {seconds:.2f}" for name, seconds in verdict.latency().items()
    )
    failed = verdict.failed_per_fault()
    overlapping = verdict.calls_per_fault()
    for name, reasons in verdict.reasons_per_fault().items():
        figures[f"chaos: {name}, why calls failed"] = "; ".join(f"{n}x {r}" for r, n in reasons)
    for fault in verdict.faults:
        codes = ", ".join(f"{n} {code}" for code, n in sorted(failed[fault.name].items()))
        ready = f"{fault.recovery_s:.0f} s" if fault.recovery_s is not None else "never"
        figures[f"chaos: {fault.name}"] = (
            f"whole again after {ready}; {overlapping[fault.name]} calls in its window, "
            f"failed: {codes or 'none'}"
        )
    began = min((c.started for c in verdict.calls), default=0.0)
    figures["chaos: faults began at (s after the load)"] = ", ".join(
        f"{fault.name} +{fault.started - began:.0f}" for fault in verdict.faults
    )
    figures["chaos: failures outside windows / other statuses"] = (
        f"{len(verdict.outside)} / {len(verdict.bad_status)}; outside at "
        + ", ".join(f"+{c.started - began:.0f} s {c.code}" for c in verdict.outside[:10])
    )
    job, at_first_fault = outcome.job, outcome.trained_before_faults
    figures["chaos: job"] = (
        f"{refit_pb2.JobState.Name(job.state)} after {job.attempts} attempts (epoch "
        f"{at_first_fault.progress.epoch} of {at_first_fault.progress.epochs} when the faults "
        f"began), new versions {new}"
    )
