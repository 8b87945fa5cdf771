"""``refit train``: fine-tune a backbone on a dataset in the object store, package the best epoch
as a TorchServe archive and store it (content-addressed), with a progress bar.

The store comes from the environment (``StorageSettings.from_env()``). The parser is built from
``trainer.config`` (no torch import); torch loads only when the command runs. Several processes:
``torchrun --nproc-per-node N -m trainer.train`` takes the same options.
"""

from __future__ import annotations

import argparse
import json
import sys

from refit.identifiers import InvalidIdentifier
from refit.registry import RegistryError
from refit.storage import StorageError, StorageSettings


def register(subparsers: argparse._SubParsersAction) -> None:
    from trainer.config import add_arguments

    parser = subparsers.add_parser(
        "train", help="fine-tune, package and store a classifier for a dataset"
    )
    add_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    from trainer.backbones import BackboneError
    from trainer.config import config_from_args
    from trainer.data import DatasetError
    from trainer.engine import TrainingCancelled
    from trainer.progress import TqdmProgress
    from trainer.train import train_and_package

    try:
        config = config_from_args(args)
        store = StorageSettings.from_env().open()
        with TqdmProgress(disable=args.quiet) as progress:
            result = train_and_package(config, store, on_event=progress)
    except (BackboneError, DatasetError, StorageError, RegistryError, InvalidIdentifier,
            TrainingCancelled) as exc:  # fmt: skip
        print(f"refit train: {exc.message}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"refit train: {exc}", file=sys.stderr)
        return 1
    if result is None:  # not rank 0 of a distributed run
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


def _summary(result: object, bucket: str) -> dict:
    return {
        "model": result.model,
        "version": result.version,
        "archive": f"s3://{bucket}/{result.archive_key}",
        "weights": f"s3://{bucket}/{result.weights_key}",
        "class_names": result.class_names,
        "metrics": result.metrics,
        "lineage": result.lineage,
    }
