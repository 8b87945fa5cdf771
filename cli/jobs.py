"""``refit retrain|jobs|job|cancel|promote|rollback|versions``: retraining through the service.

    refit retrain --model flowers --dataset s3://data/flowers --epochs 5 --watch
    refit jobs --model flowers --state TRAINING
    refit promote flowers 3 ; refit rollback flowers ; refit versions flowers

Everything goes through the refit service at REFIT_ADDRESS (default 127.0.0.1:50051); ``--json``
prints machine-readable output. No torch import.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable

import grpc
from google.protobuf.json_format import MessageToDict

from cli.serving import add_common, report_error, run_models, stub_for
from refit.v1 import refit_pb2 as pb

TERMINAL = (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED)


def register(subparsers: argparse._SubParsersAction) -> None:
    retrain = subparsers.add_parser("retrain", help="start a retraining job")
    retrain.add_argument("--model", required=True)
    retrain.add_argument("--dataset", required=True, metavar="s3://BUCKET/PREFIX")
    retrain.add_argument("--backbone", default="", help="default: efficientnet_lite0")
    retrain.add_argument("--base-version", default="", help="continue from this version")
    recipe = "0: the default recipe's, chosen from the dataset"
    retrain.add_argument("--epochs", type=int, default=0, help=recipe)
    retrain.add_argument("--batch-size", type=int, default=0, help=recipe)
    retrain.add_argument("--lr", type=float, default=0.0)
    retrain.add_argument("--crop-size", type=int, default=0, help=f"input size; {recipe}")
    retrain.add_argument("--val-fraction", type=float, default=0.0)
    retrain.add_argument("--seed", type=int, default=0)
    retrain.add_argument("--freeze", type=int, default=None, help="units frozen; -1: none")
    retrain.add_argument("--force", action="store_true", help="promote even if not better")
    retrain.add_argument(
        "--serving-batch-size", type=int, default=0,
        help="most Predicts TorchServe batches into one forward pass; 0: REFIT_BATCH_SIZE",
    )  # fmt: skip
    retrain.add_argument(
        "--max-batch-delay-ms", type=int, default=0,
        help="longest wait for a batch to fill; 0: REFIT_MAX_BATCH_DELAY_MS",
    )  # fmt: skip
    retrain.add_argument(
        "--fp32", action="store_true",
        help="serve fp32; default: int8 when it costs at most REFIT_INT8_MAX_DROP_POINTS",
    )  # fmt: skip
    retrain.add_argument("--created-by", default="", help="kept in the version's lineage")
    retrain.add_argument("--watch", action="store_true", help="follow it with a progress bar")
    _command(retrain, run_retrain)

    jobs = subparsers.add_parser("jobs", help="list retraining jobs, newest first")
    jobs.add_argument("--model", default="")
    jobs.add_argument("--state", action="append", default=[], choices=pb.JobState.keys()[1:])
    jobs.add_argument("--limit", type=int, default=20)
    _command(jobs, run_jobs)

    job = subparsers.add_parser("job", help="show one job (--watch: follow it)")
    job.add_argument("id")
    job.add_argument("--watch", action="store_true")
    _command(job, run_job)

    cancel = subparsers.add_parser("cancel", help="cancel a queued or training job")
    cancel.add_argument("id")
    _command(cancel, run_cancel)

    promote = subparsers.add_parser("promote", help="make a version the default")
    promote.add_argument("model")
    promote.add_argument("version")
    _command(promote, run_promote)

    rollback = subparsers.add_parser("rollback", help="make the previous version the default")
    rollback.add_argument("model")
    rollback.add_argument("--to", default="", help="this version instead of the previous one")
    _command(rollback, run_rollback)

    versions = subparsers.add_parser("versions", help="a model's versions and its default")
    versions.add_argument("name", metavar="model")
    _command(versions, run_models)


def _command(parser: argparse.ArgumentParser, run) -> None:
    add_common(parser)
    parser.set_defaults(run=_guarded(run))


def _guarded(run):
    def guarded(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except grpc.RpcError as exc:
            report_error(args, args.command, exc)
            return 1

    return guarded


# --- commands --------------------------------------------------------------------------------


def run_retrain(args: argparse.Namespace) -> int:
    hp = pb.Hyperparameters(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, crop_size=args.crop_size,
        val_fraction=args.val_fraction, seed=args.seed,
    )  # fmt: skip
    if args.freeze is not None:
        hp.freeze = args.freeze
    request = pb.RetrainRequest(
        model=args.model, dataset_uri=args.dataset, backbone=args.backbone,
        base_version=args.base_version, hyperparameters=hp, force=args.force,
        created_by=args.created_by,
        batching=pb.Batching(
            batch_size=args.serving_batch_size, max_batch_delay_ms=args.max_batch_delay_ms
        ),
        precision=pb.PRECISION_FP32 if args.fp32 else pb.PRECISION_UNSPECIFIED,
    )  # fmt: skip
    stub = stub_for(args)
    job = stub.Retrain(request, timeout=args.timeout)
    if not args.watch:
        _print_job(args, job)
        return 0
    if not args.json:
        print(f"job {job.id}: {args.model} from {args.dataset}", flush=True)
    return _watch(args, stub, job.id)


def run_jobs(args: argparse.Namespace) -> int:
    request = pb.ListJobsRequest(
        model=args.model, states=[pb.JobState.Value(s) for s in args.state], limit=args.limit
    )
    jobs = stub_for(args).ListJobs(request, timeout=args.timeout).jobs
    if args.json:
        print(json.dumps([_as_dict(j) for j in jobs], indent=1))
        return 0
    for job in jobs:
        print(job_line(job))
    return 0


def run_job(args: argparse.Namespace) -> int:
    stub = stub_for(args)
    if args.watch:
        return _watch(args, stub, args.id)
    _print_job(args, stub.GetJob(pb.GetJobRequest(id=args.id), timeout=args.timeout))
    return 0


def run_cancel(args: argparse.Namespace) -> int:
    job = stub_for(args).CancelJob(pb.CancelJobRequest(id=args.id), timeout=args.timeout)
    _print_job(args, job)
    return 0


def run_promote(args: argparse.Namespace) -> int:
    request = pb.SetDefaultVersionRequest(model=args.model, version=args.version)
    model = stub_for(args).SetDefaultVersion(request, timeout=args.timeout)
    _print_default(args, model)
    return 0


def run_rollback(args: argparse.Namespace) -> int:
    stub = stub_for(args)
    model = stub.GetModel(pb.GetModelRequest(name=args.model), timeout=args.timeout)
    target = args.to or previous_version(model)
    if not target:
        print(f"{args.model}: no version before v{model.default_version}", file=sys.stderr)
        return 1
    request = pb.SetDefaultVersionRequest(model=args.model, version=target)
    _print_default(args, stub.SetDefaultVersion(request, timeout=args.timeout))
    return 0


# --- helpers (pure: unit-tested) -------------------------------------------------------------


def previous_version(model: pb.Model) -> str:
    """The newest version published before the default (versions are listed oldest first)."""
    names = [v.version for v in model.versions]
    if model.default_version not in names:
        return ""
    index = names.index(model.default_version)
    return names[index - 1] if index > 0 else ""


def state_name(job: pb.Job) -> str:
    return pb.JobState.Name(job.state)


def job_line(job: pb.Job) -> str:
    line = f"{job.id}  {job.model:16} {state_name(job):12}"
    if job.version:
        line += f" v{job.version}"
    if job.state == pb.QUEUED and job.queue_position:
        line += f"  (#{job.queue_position} in queue)"
    elif job.detail:  # what a running job waits for, e.g. TorchServe to return
        line += f"  {job.detail}"
    elif job.state == pb.TRAINING and job.progress.epochs:
        line += f"  epoch {job.progress.epoch}/{job.progress.epochs}"
    elif job.state == pb.SUCCEEDED:
        verdict = "default" if job.gate.promoted else "candidate"
        line += f"  val_acc {job.metrics.get('val_accuracy', 0):.1%} -> {verdict}"
    elif job.error:
        line += f"  {job.error}"
    return line


def progress_line(progress: pb.EpochProgress) -> str:
    done = progress.batch / progress.batches if progress.batches else 0.0
    bar = "#" * int(20 * min(done, 1.0))
    text = (
        f"epoch {progress.epoch}/{progress.epochs} [{bar:<20}] loss {progress.loss:.3f} "
        f"acc {progress.accuracy:.3f} {progress.images_per_second:.0f} img/s "
        f"ETA {duration(progress.eta_seconds)}"
    )
    if progress.epoch_end:
        text += f"  val_acc {progress.val_accuracy:.3f}"
    return text


def duration(seconds: float) -> str:
    if seconds < 0 or math.isinf(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"


def summary(job: pb.Job) -> str:
    if job.state == pb.SUCCEEDED:
        gate = job.gate
        verdict = "now the default" if gate.promoted else "kept as a candidate"
        phases = ", ".join(f"{k} {v:.1f}s" for k, v in sorted(job.phase_seconds.items()))
        return (
            f"{job.model} v{job.version}: {verdict} ({gate.reason})\n"
            f"  val_accuracy {job.metrics.get('val_accuracy', 0):.4f}; {phases}"
        )
    return f"{job.model}: {state_name(job)}: {job.error}"


# --- output ----------------------------------------------------------------------------------


def _watch(args: argparse.Namespace, stub, job_id: str) -> int:
    events: Iterable[pb.JobEvent] = stub.WatchJob(pb.WatchJobRequest(id=job_id))
    live = sys.stdout.isatty() and not args.json
    last_state, job = None, None
    for event in events:
        job = event.job
        if args.json:
            print(json.dumps({"kind": event.kind, "job": _as_dict(job)}), flush=True)
            continue
        if job.state != last_state:
            if live and last_state == pb.TRAINING:
                print()
            print(f"{state_name(job).lower().replace('_', ' ')}", flush=True)
            last_state = job.state
        if event.kind == "detail" and job.detail:
            print(f"  {job.detail}", flush=True)
        if event.kind == "progress" and job.progress.epochs:
            line = progress_line(job.progress)
            if live:
                print("\r" + line, end="\n" if job.progress.epoch_end else "", flush=True)
            elif job.progress.epoch_end:
                print(line, flush=True)
    if job is None:
        return 1
    if not args.json:
        print(summary(job))
    return 0 if job.state == pb.SUCCEEDED else 1


def _print_job(args: argparse.Namespace, job: pb.Job) -> None:
    if args.json:
        print(json.dumps(_as_dict(job), indent=1))
    else:
        print(job_line(job))


def _print_default(args: argparse.Namespace, model: pb.Model) -> None:
    if args.json:
        print(json.dumps(MessageToDict(model), indent=1))
    else:
        print(f"{model.name}: default is now v{model.default_version}")


def _as_dict(message) -> dict:
    # Every field, defaults included: scripts should not have to know proto3's omissions.
    return MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
