"""Trainer settings read from the environment."""

from __future__ import annotations

import pytest

from refit.registry import Batching
from trainer.jobs.request import train_config
from trainer.jobs.settings import TrainerSettings


@pytest.mark.parametrize(("value", "workers"), [(None, None), ("auto", None), ("0", 0), ("3", 3)])
def test_loader_workers_default_to_auto(value: str | None, workers: int | None) -> None:
    env = {} if value is None else {"REFIT_TRAINER_LOADER_WORKERS": value}
    assert TrainerSettings.from_env(env).loader_workers == workers


def test_bad_loader_workers_is_an_error_at_start_up() -> None:
    with pytest.raises(ValueError, match="many"):
        TrainerSettings.from_env({"REFIT_TRAINER_LOADER_WORKERS": "many"})


def test_batching_of_new_versions_from_the_environment() -> None:
    assert TrainerSettings.from_env({}).batching == Batching()
    env = {"REFIT_BATCH_SIZE": "16", "REFIT_MAX_BATCH_DELAY_MS": "20"}
    assert TrainerSettings.from_env(env).batching == Batching(16, 20)
    with pytest.raises(ValueError, match="batch_size must be 1-256"):
        TrainerSettings.from_env({"REFIT_BATCH_SIZE": "0"})


def test_mid_epoch_checkpoint_interval_from_the_environment_reaches_each_job() -> None:
    assert TrainerSettings.from_env({}).checkpoint_interval_s == 600.0
    settings = TrainerSettings.from_env({"REFIT_TRAINER_CHECKPOINT_INTERVAL_S": "30"})
    request = {"model": "flowers", "dataset_uri": "s3://datasets/flowers"}
    assert train_config(request, settings).checkpoint_interval_s == 30.0
    with pytest.raises(ValueError, match="REFIT_TRAINER_CHECKPOINT_INTERVAL_S"):
        TrainerSettings.from_env({"REFIT_TRAINER_CHECKPOINT_INTERVAL_S": "-1"})


def test_health_address_and_stream_cap_from_the_environment() -> None:
    defaults = TrainerSettings.from_env({})
    assert (defaults.health_address, defaults.max_streams) == ("127.0.0.1:50053", 8)
    env = {"REFIT_TRAINER_HEALTH_ADDRESS": "0.0.0.0:50053", "REFIT_TRAINER_MAX_STREAMS": "2"}
    settings = TrainerSettings.from_env(env)
    assert (settings.health_address, settings.max_streams) == ("0.0.0.0:50053", 2)
    with pytest.raises(ValueError, match="REFIT_TRAINER_MAX_STREAMS must be 1 or more"):
        TrainerSettings.from_env({"REFIT_TRAINER_MAX_STREAMS": "0"})
