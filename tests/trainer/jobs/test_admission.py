"""Retrain requests are refused at submit, not queued to fail later: the runner's validate on a
real embedded store, with the message naming the allowed range or the known names."""

from __future__ import annotations

import pytest

from refit.errors import InvalidArgument
from refit.lineage import Lineage
from refit.publish import Publisher
from refit.registry import Registry, VersionRecord
from refit.storage import FileStore
from trainer.jobs.admission import RANGES
from trainer.jobs.runner import TrainingRunner
from trainer.jobs.settings import TrainerSettings

DATASET = "s3://datasets/flowers"


@pytest.fixture
def runner(file_store: FileStore) -> TrainingRunner:
    file_store.ensure_bucket("refit")
    file_store.ensure_bucket("datasets")
    file_store.put("datasets", "flowers/rose/1.png", b"png")
    file_store.ensure_bucket("empty")
    registry = Registry(file_store, "refit")
    registry.add(VersionRecord("flowers", "1", "archives/a.mar", ["rose"], lineage=Lineage(
        backbone="resnet18", weights_key="weights/flowers/1.pt")))  # fmt: skip
    registry.add(VersionRecord("flowers", "2", "archives/b.mar", ["rose"]))
    settings = TrainerSettings(bucket="refit", storage=None)
    return TrainingRunner(settings, file_store, Publisher(file_store, "refit", None))


def refused(runner: TrainingRunner, **fields: object) -> str:
    request = {"model": "flowers", "dataset_uri": DATASET, **fields}
    with pytest.raises(InvalidArgument) as caught:
        runner.validate(request)
    return caught.value.message


def test_a_good_request_is_admitted(runner: TrainingRunner) -> None:
    runner.validate({"model": "flowers", "dataset_uri": DATASET})
    runner.validate({
        "model": "flowers", "dataset_uri": DATASET, "base_version": "1",
        "hyperparameters": {"epochs": 200, "batch_size": 1024, "lr": 1e-9, "crop_size": 32,
                            "val_fraction": 0.5, "patience": 1, "freeze": 3, "seed": 9},
    })  # fmt: skip


@pytest.mark.parametrize(
    ("hyperparameters", "fragment"),
    [
        ({"epochs": 100000}, "epochs must be between 1 and 200"),
        ({"batch_size": 4096}, "batch_size must be between 1 and 1024"),
        ({"lr": 5.0}, "lr must be between 1e-09 and 1"),
        ({"lr": -0.1}, "lr must be between"),
        ({"crop_size": 8}, "crop_size must be between 32 and 1024"),
        ({"val_fraction": 0.9}, "val_fraction must be between 0.05 and 0.5"),
        ({"patience": 0}, "patience must be between 1 and 200"),
        ({"head_epochs": 500}, "head_epochs must be between 0 and 200"),
        ({"freeze": 18}, "freeze must be between -1 and 17"),
        ({"freeze": -2}, "freeze must be >= -1"),
    ],
)
def test_hyperparameters_out_of_range(
    runner: TrainingRunner, hyperparameters: dict, fragment: str
) -> None:
    assert fragment in refused(runner, hyperparameters=hyperparameters)


def test_every_documented_range_is_checked() -> None:
    assert set(RANGES) == {"epochs", "head_epochs", "batch_size", "lr", "crop_size",
                           "val_fraction", "patience"}  # fmt: skip


def test_unknown_backbone_names_the_known_ones(runner: TrainingRunner) -> None:
    message = refused(runner, backbone="resnet1000")
    assert "unknown backbone 'resnet1000'" in message and "efficientnet_lite0" in message


def test_freeze_range_follows_the_base_versions_backbone(runner: TrainingRunner) -> None:
    assert "between -1 and 4" in refused(
        runner, base_version="1", hyperparameters={"freeze": 5}
    )  # resnet18: 4 stages above the stem


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"dataset_uri": "s3://nosuchbucket/flowers"}, "bucket 'nosuchbucket' does not exist"),
        ({"dataset_uri": "s3://empty/flowers"}, "no objects under s3://empty/flowers"),
        ({"dataset_uri": "s3://datasets/tulips"}, "no objects under s3://datasets/tulips"),
        ({"dataset_uri": "s3://datasets/../refit"}, "invalid"),
        ({"base_version": "9"}, "base_version: model 'flowers' has no version '9'"),
        ({"base_version": "2"}, "has no weights to continue from"),
        ({"base_version": "../1"}, "invalid base_version"),
    ],
)
def test_datasets_and_starting_points(runner: TrainingRunner, fields: dict, fragment: str) -> None:
    assert fragment in refused(runner, **fields)


@pytest.mark.parametrize(
    ("batching", "fragment"),
    [
        ({"batch_size": 1000}, "batching: batch_size must be 1-256, got 1000"),
        ({"max_batch_delay_ms": 5000}, "batching: max_batch_delay_ms must be 1-1000, got 5000"),
    ],
)
def test_batching_out_of_range(runner: TrainingRunner, batching: dict, fragment: str) -> None:
    assert fragment in refused(runner, batching=batching)
    runner.validate({"model": "flowers", "dataset_uri": DATASET, "batching": {"batch_size": 256}})
