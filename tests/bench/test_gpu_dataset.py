"""bench/gpu_dataset.py: the generated dataset gpu_check.py trains on."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("cpu", [True, False])
def test_the_training_set_is_whole_batches(gpu_check, gpu_dataset, cpu: bool) -> None:
    """A last batch of one image fails BatchNorm in training mode."""
    sizes = gpu_check.Sizes.for_device(cpu)
    assert sizes.classes * sizes.per_class % sizes.batch == 0
    assert sizes.classes <= len(gpu_dataset.COLOURS)


def test_the_dataset_has_explicit_splits(gpu_check, gpu_dataset, file_store) -> None:
    file_store.ensure_bucket(gpu_dataset.BUCKET)
    sizes = gpu_check.Sizes.for_device(cpu=True)
    gpu_dataset.upload_dataset(file_store, sizes)
    keys = [info.key for info in file_store.list(gpu_dataset.BUCKET, "data/")]
    train = [k for k in keys if k.startswith("data/train/")]
    assert len(train) == sizes.classes * sizes.per_class
    assert len(keys) - len(train) == sizes.classes * sizes.val_per_class
