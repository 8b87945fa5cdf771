"""``refit train``: fine-tune a backbone on a dataset in the object store, package the best epoch
as a TorchServe archive and store it (content-addressed), with a progress bar.

The store comes from the environment (``StorageSettings.from_env()``). The parser is built from
``trainer.config`` (no torch import); torch loads only when the command runs. ``--nproc-per-node
N`` trains as N processes under torchrun (DDP), and ``--nnodes``/``--rdzv-endpoint`` across hosts,
each running the same command (trainer/jobs/processes.py).
"""

from __future__ import annotations

import argparse
import json
import sys

from refit.errors import RefitError
from refit.identifiers import InvalidIdentifier
from refit.registry import RegistryError
from refit.storage import StorageError, StorageSettings


def register(subparsers: argparse._SubParsersAction) -> None:
    from trainer.config import add_arguments

    parser = subparsers.add_parser(
        "train", help="fine-tune, package and store a classifier for a dataset"
    )
    add_arguments(parser)
    a = parser.add_argument
    a(
        "--nproc-per-node",
        type=int,
        default=1,
        help="training processes on this host, under torchrun (DDP): one per GPU, or a few on CPU",
    )
    a("--nnodes", type=int, default=1, help="hosts in the run, each running this same command")
    a(
        "--rdzv-endpoint",
        default=None,
        metavar="HOST:PORT",
        help="where the hosts meet (torchrun's c10d rendezvous), with --nnodes > 1",
    )
    a("--rdzv-id", default=None, help="the run's name at the rendezvous (default: refit-OUT)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    from trainer.backbones import BackboneError
    from trainer.config import config_from_args
    from trainer.data import DatasetError
    from trainer.engine import TrainingCancelled
    from trainer.progress import TqdmProgress

    try:
        config = config_from_args(args)
        with TqdmProgress(disable=args.quiet) as progress:
            result = _train(config, args, progress)
    except (BackboneError, DatasetError, StorageError, RegistryError, InvalidIdentifier,
            TrainingCancelled, RefitError) as exc:  # fmt: skip
        print(f"refit train: {exc.message}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"refit train: {exc}", file=sys.stderr)
        return 1
    if result is None:  # rank 0 ran on another host
        return 0
    if args.json:
        print(json.dumps(_summary(result, config.bucket), indent=1))
    else:
        print(
            f"{result.model} v{result.version}: val_accuracy {result.metrics['val_accuracy']:.4f}"
            f" (best epoch {int(result.metrics['best_epoch']) + 1})"
            f" -> s3://{config.bucket}/{result.archive_key}"
        )
    return 0


def _train(config, args: argparse.Namespace, progress):
    """In this process, or as torchrun processes when asked for more than one."""
    from trainer.jobs.processes import Launch, train_in_processes
    from trainer.train import train_and_package

    settings = StorageSettings.from_env()
    if args.nproc_per_node == 1 and args.nnodes == 1:
        return train_and_package(config, settings.open(), on_event=progress)
    launch = Launch(
        args.nproc_per_node,
        nnodes=args.nnodes,
        rdzv_endpoint=args.rdzv_endpoint,
        rdzv_id=args.rdzv_id or f"refit-{config.out}",
    )
    return train_in_processes(config, launch, settings, on_event=progress)


def _summary(result: object, bucket: str) -> dict:
    return {
        "model": result.model,
        "version": result.version,
        "archive": f"s3://{bucket}/{result.archive_key}",
        "weights": f"s3://{bucket}/{result.weights_key}",
        "class_names": result.class_names,
        "metrics": result.metrics,
        "lineage": result.lineage.to_dict(),
    }
