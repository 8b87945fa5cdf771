"""The fine-tuning config's command-line form."""

from __future__ import annotations

import argparse

import pytest

from trainer.config import NO_FREEZE, add_arguments, config_from_args


def _parse(*argv: str):
    parser = add_arguments(argparse.ArgumentParser())
    return config_from_args(parser.parse_args(["--dataset", "s3://b/d", "--out", "m", *argv]))


def test_defaults_leave_the_hardware_and_the_recipe_to_choose() -> None:
    config = _parse()
    assert config.channels_last is None and config.freeze is None
    assert (config.epochs, config.batch_size, config.crop_size, config.augmentation) == (None,) * 4
    assert not config.complete


def test_one_augmentation_flag_starts_from_the_mild_defaults() -> None:
    augmentation = _parse("--rotation", "10").augmentation
    assert augmentation.rotation == 10 and augmentation.hflip == 0.5
    assert augmentation.translate == 0.0 and augmentation.crop_scale == (0.85, 1.0)


def test_flags_reach_the_config() -> None:
    config = _parse("--no-channels-last", "--translate", "0.1", "--crop-scale", "0.85", "1",
                    "--freeze", "none", "--epochs", "30")  # fmt: skip
    assert config.channels_last is False and config.freeze == NO_FREEZE and config.epochs == 30
    assert config.augmentation.translate == 0.1 and config.augmentation.crop_scale == (0.85, 1.0)
    assert "translate" in config.hyperparameters()["augmentation"]


def test_every_augmentation_field_and_the_weight_average_have_flags() -> None:
    config = _parse("--mixup", "0.2", "--cutmix", "1", "--color-jitter", "0.1", "--hflip", "0",
                    "--ema-decay", "0.99", "--trivial-augment", "--erasing", "0.25")  # fmt: skip
    assert (config.augmentation.mixup, config.augmentation.cutmix) == (0.2, 1.0)
    assert config.augmentation.trivial_augment and config.augmentation.erasing == 0.25
    assert config.augmentation.color_jitter == 0.1 and config.augmentation.hflip == 0
    assert config.ema_decay == 0.99 and config.hyperparameters()["ema_decay"] == 0.99


def test_an_impossible_translation_is_rejected() -> None:
    with pytest.raises(ValueError, match="translate"):
        _parse("--translate", "1.5")


def test_the_checkpoint_interval_is_a_flag_that_leaves_the_run_id_alone() -> None:
    config = _parse("--checkpoint-interval-s", "30")
    assert config.checkpoint_interval_s == 30.0 and _parse().checkpoint_interval_s == 600.0
    # A rerun with another interval resumes the same checkpoint.
    assert config.fingerprint("digest") == _parse().fingerprint("digest")
    with pytest.raises(ValueError, match="checkpoint_interval_s"):
        _parse("--checkpoint-interval-s", "-5")
