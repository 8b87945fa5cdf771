"""The chaos run's long form (the container test runs one round: tests/containers/
test_stack_under_faults.py). Builds the images, brings the compose stack up with two service and
two TorchServe replicas and the policed object store, trains a model, then runs ROUNDS rounds:
each a retrain under CLIENTS clients' Predicts for two models, with the trainer killed mid-epoch,
a TorchServe replica and a service replica killed, and the object store frozen. Prints, per
round and in all, the calls answered, wrong and failed (per fault, by status), each fault's time
until the stack is whole again, and the job's outcome.

    PYTHONPATH=. .venv/bin/python bench/chaos.py [--rounds 3] [--clients 16] [--frozen-s 60]

Needs a Docker engine (`bash deploy/containers/engine.sh start`) and about 30 minutes a round on
two cores; figures go to docs/reliability.md, *Faults under load*.
"""

from __future__ import annotations

import argparse
import io
import tempfile
from collections import Counter
from pathlib import Path

from PIL import Image
from skimage import data

from deploy.containers.chaos import Chaos, Request, Verdict, colour_dataset, colour_image
from deploy.containers.stack import ComposeStack
from refit.v1 import refit_pb2

CLASSES = {"red": (200, 30, 30), "blue": (30, 30, 200)}
COFFEE = {"espresso", "cup", "coffee mug"}
GRACE_S = 15.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--frozen-s", type=float, default=60.0, help="object store frozen")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--images-per-class", type=int, default=60)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="refit-chaos-") as tmp:
        stack = ComposeStack(Path(tmp))
        stack.build()
        try:
            stack.up()
            run(stack, Path(tmp), args)
        finally:
            stack.down()


def run(stack: ComposeStack, tmp: Path, args: argparse.Namespace) -> None:
    buffer = io.BytesIO()
    Image.fromarray(data.coffee()).save(buffer, "JPEG")
    coffee, red = buffer.getvalue(), colour_image(CLASSES["red"])
    stack.wait_until_predicts(coffee)
    chaos = Chaos(
        stack,
        [
            Request("imagenet", coffee, lambda v, labels: v == "1" and bool(set(labels) & COFFEE)),
            Request("colours", red),
        ],
        clients=args.clients,
        store_frozen_s=args.frozen_s,
    )
    dataset = colour_dataset(tmp / "colours", CLASSES, args.images_per_class)
    stack.aws("s3", "cp", "--recursive", "--only-show-errors", "/data", "s3://datasets/colours",
              mount=dataset)  # fmt: skip
    first = chaos.admin("Retrain", retrain(epochs=2))  # a colours model to send Predicts to
    chaos.wait_job(first.id, lambda j: j.state == refit_pb2.SUCCEEDED, 1800)

    totals: Counter[str] = Counter()
    for number in range(1, args.rounds + 1):
        outcome = chaos.run(retrain(args.epochs))
        verdict = chaos.judge(outcome, GRACE_S)
        report(number, verdict, outcome.job)
        totals.update(
            calls=len(verdict.calls),
            answered=sum(c.code == "OK" for c in verdict.calls),
            wrong=len(verdict.wrong),
            outside=len(verdict.outside),
            other_status=len(verdict.bad_status),
            succeeded=int(outcome.job.state == refit_pb2.SUCCEEDED),
        )
    print(f"all {args.rounds} rounds: {dict(totals)}")


def retrain(epochs: int) -> refit_pb2.RetrainRequest:
    return refit_pb2.RetrainRequest(
        model="colours",
        dataset_uri="s3://datasets/colours",
        hyperparameters=refit_pb2.Hyperparameters(epochs=epochs, crop_size=64, batch_size=8),
    )


def report(number: int, verdict: Verdict, job: refit_pb2.Job) -> None:
    answered = sum(c.code == "OK" for c in verdict.calls)
    print(f"round {number}: {len(verdict.calls)} calls, {answered} answered, "
          f"{len(verdict.wrong)} wrong, {len(verdict.outside)} failed outside a window, "
          f"{len(verdict.bad_status)} with another status; job "
          f"{refit_pb2.JobState.Name(job.state)} after {job.attempts} attempts")  # fmt: skip
    latency = ", ".join(f"{k} {v:.2f} s" for k, v in verdict.latency().items())
    print(f"  answered in: {latency}")
    began = min((c.started for c in verdict.calls), default=0.0)
    for call in verdict.outside + verdict.bad_status:
        print(f"  outside a window: +{call.started - began:.0f} s {call.model} via {call.address}: "
              f"{call.code} {call.message[:90]}")  # fmt: skip
    for fault in verdict.faults:
        print(f"  {fault.name} at +{fault.started - began:.0f} s")
    failed, overlapping = verdict.failed_per_fault(), verdict.calls_per_fault()
    for fault in verdict.faults:
        ready = f"{fault.recovery_s:.0f} s" if fault.recovery_s is not None else "never"
        codes = dict(failed[fault.name]) or "none"
        print(f"  {fault.name}: whole again after {ready}; {overlapping[fault.name]} calls in "
              f"its window; failed {codes}")  # fmt: skip


if __name__ == "__main__":
    main()
