"""What a retrain request must satisfy before it is queued, so that a job never waits in the
queue only to fail on something the request already said: INVALID_ARGUMENT, naming the allowed
range or the known names. docs/user-guide.md *Retrain requests* lists the same ranges.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from refit.errors import InvalidArgument
from refit.identifiers import check_version
from refit.registry import ModelNotFound, Registry
from refit.storage import AccessDenied, NoSuchBucket, ObjectStore, S3Uri
from trainer.config import NO_FREEZE, TrainConfig


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    why: str = ""

    def check(self, name: str, value: float) -> None:
        if not self.low <= value <= self.high:
            why = f" ({self.why})" if self.why else ""
            raise InvalidArgument(
                f"hyperparameters.{name} must be between {self.low:g} and {self.high:g}{why}, "
                f"got {value:g}"
            )


# Zero (unset) means the trainer's default, which is always in range.
RANGES = {
    "epochs": Range(1, 200, "fine-tuning converges in tens of epochs"),
    "head_epochs": Range(0, 200),
    "batch_size": Range(1, 1024),
    "lr": Range(1e-9, 1.0),
    "crop_size": Range(32, 1024, "pixels"),
    "val_fraction": Range(0.05, 0.5),
    "patience": Range(1, 200, "epochs without improvement"),
}


def check_hyperparameters(hyperparameters: dict) -> None:
    """The request's own values (proto JSON form), before defaults are applied."""
    for name, allowed in RANGES.items():
        value = hyperparameters.get(name)
        if value is not None and (value != 0 or name == "patience"):
            allowed.check(name, float(value))


def check_dataset(store: ObjectStore, uri: str) -> None:
    """The dataset's bucket exists and holds objects under the prefix."""
    location = S3Uri.parse(uri)
    try:
        first = next(iter(store.list(location.bucket, location.key)), None)
    except NoSuchBucket as exc:
        raise InvalidArgument(
            f"dataset_uri: bucket {location.bucket!r} does not exist; upload the dataset first "
            f"(`refit dataset upload DIR {uri}`)"
        ) from exc
    except AccessDenied as exc:
        # The store answers so for a bucket outside the trainer's policy, existing or not.
        raise InvalidArgument(
            f"dataset_uri: the object store says the trainer may not read {uri}; upload the "
            "dataset to a bucket the trainer's policy reads (`datasets` in the shipped policies)"
        ) from exc
    if first is None:
        raise InvalidArgument(
            f"dataset_uri: no objects under {uri}; upload the dataset first "
            f"(`refit dataset upload DIR {uri}`)"
        )


def check_starting_point(store: ObjectStore, config: TrainConfig, base_version: str) -> None:
    """A known backbone, or a base version trained by refit; freeze within its units."""
    from trainer.backbones import BackboneRegistry, UnknownBackbone

    backbone = config.backbone
    if base_version:
        check_version(base_version, "base_version")
        try:
            record = Registry(store, config.bucket).get(config.out, base_version)
        except ModelNotFound as exc:
            raise InvalidArgument(f"base_version: {exc.message}") from exc
        if not record.lineage.weights_key:
            raise InvalidArgument(
                f"base_version: {config.out} v{base_version} has no weights to continue from "
                "(it was not trained by refit); start from a backbone instead"
            )
        backbone = record.lineage.backbone or backbone
    try:
        BackboneRegistry().get(backbone)
    except UnknownBackbone as exc:
        raise InvalidArgument(f"backbone: {exc.message}") from exc
    if config.freeze is not None:
        Range(NO_FREEZE, _units(backbone), f"-1: none; units of {backbone}").check(
            "freeze", config.freeze
        )


@functools.cache
def _units(backbone: str) -> int:
    """Units above the stem (the deepest freeze); building the model once tells."""
    from trainer.backbones import BackboneRegistry

    spec = BackboneRegistry().get(backbone)
    return spec.num_units(spec.build())
