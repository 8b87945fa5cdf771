"""A Retrain request in the engine's terms: zero values are defaults, the job pins run id and
version, and the new version's batching is the request's or the trainer's."""

from __future__ import annotations

import pytest

from refit.identifiers import InvalidModelName
from refit.registry import Batching
from trainer.jobs.request import batching_for, train_config
from trainer.jobs.settings import TrainerSettings

SETTINGS = TrainerSettings(bucket="b", loader_workers=3, device="cpu", weights_uri="s3://w/")


def test_zero_values_mean_defaults_and_the_job_pins_run_id_and_version() -> None:
    config = train_config(
        {"model": "m", "dataset_uri": "s3://data/p"}, SETTINGS, job_id="job-1", version="4"
    )
    assert (config.out, config.dataset, config.lr) == ("m", "s3://data/p", 2e-3)
    # Left to the recipe, chosen from the dataset when training starts (trainer/recipe.py).
    assert (config.epochs, config.batch_size, config.crop_size, config.augmentation) == (None,) * 4
    assert config.run_id == "job-1" and config.version == "4" and config.resume
    assert (config.bucket, config.workers, config.device) == ("b", 3, "cpu")
    assert config.freeze is None and config.init_from is None and config.log_every == 1


def test_hyperparameters_and_base_version_are_passed_on() -> None:
    request = {
        "model": "m",
        "dataset_uri": "s3://data/p",
        "base_version": "2",
        "backbone": "resnet18",
        "hyperparameters": {"epochs": 3, "batch_size": 8, "lr": 0.01, "crop_size": 64,
                            "val_fraction": 0.3, "seed": 5, "freeze": -1, "patience": 2},
    }  # fmt: skip
    config = train_config(request, SETTINGS)
    assert config.init_from == "m:2" and config.backbone == "resnet18"
    assert (config.epochs, config.batch_size, config.lr, config.crop_size) == (3, 8, 0.01, 64)
    assert (config.val_fraction, config.seed, config.freeze, config.patience) == (0.3, 5, -1, 2)


def test_batching_of_the_new_version_is_the_requests_or_the_trainers() -> None:
    settings = TrainerSettings(batch_size=8, max_batch_delay_ms=5)
    assert batching_for({}, settings) == Batching(8, 5)
    assert batching_for({"batching": {"batch_size": 1}}, settings) == Batching(1, 5)
    asked = {"batching": {"batch_size": 16, "max_batch_delay_ms": 20}}
    assert batching_for(asked, settings) == Batching(16, 20)


def test_a_request_may_ask_for_fp32_and_the_int8_limit_is_the_trainers() -> None:
    """Proto JSON names the enum value; unset: int8 when it costs no accuracy."""
    settings = TrainerSettings(int8_max_drop=0.5)
    base = {"model": "m", "dataset_uri": "s3://data/p"}
    assert train_config(base, settings).precision == "auto"
    assert train_config(base, settings).int8_max_drop == 0.5
    assert train_config({**base, "precision": "PRECISION_FP32"}, settings).precision == "fp32"
    with pytest.raises(ValueError, match="int8 is served only when it costs no accuracy"):
        train_config({**base, "precision": "PRECISION_INT8"}, settings)


@pytest.mark.parametrize(
    ("request_", "error"),
    [
        ({"model": "Bad!", "dataset_uri": "s3://data/p"}, InvalidModelName),
        ({"model": "m", "dataset_uri": "/local/dir"}, ValueError),
        ({"model": "m", "dataset_uri": "s3://data/p", "hyperparameters": {"lr": -1}}, ValueError),
    ],
)
def test_invalid_requests(request_: dict, error: type[Exception]) -> None:
    with pytest.raises(error):
        train_config(request_, SETTINGS)
