"""Trainer settings read from the environment."""

from __future__ import annotations

import pytest

from trainer.jobs.settings import TrainerSettings


@pytest.mark.parametrize(("value", "workers"), [(None, None), ("auto", None), ("0", 0), ("3", 3)])
def test_loader_workers_default_to_auto(value: str | None, workers: int | None) -> None:
    env = {} if value is None else {"REFIT_TRAINER_LOADER_WORKERS": value}
    assert TrainerSettings.from_env(env).loader_workers == workers


def test_bad_loader_workers_is_an_error_at_start_up() -> None:
    with pytest.raises(ValueError, match="many"):
        TrainerSettings.from_env({"REFIT_TRAINER_LOADER_WORKERS": "many"})
