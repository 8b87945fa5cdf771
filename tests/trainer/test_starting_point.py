"""The model a run starts from."""

from __future__ import annotations

import pytest

from refit.lineage import Lineage
from refit.registry import Registry, VersionRecord
from refit.storage import FileStore
from tests.trainer.fitting import small_config
from tests.trainer.synthetic import CLASS_NAMES
from trainer.backbones import BackboneRegistry
from trainer.starting_point import StartingPointError, build_model


def test_a_version_without_stored_weights_points_to_its_backbone(file_store: FileStore) -> None:
    file_store.ensure_bucket("refit")
    record = VersionRecord(
        model="imagenet",
        version="1",
        archive_key="archives/imagenet/x.mar",
        class_names=["a", "b"],
        lineage=Lineage(backbone="efficientnet_lite0"),
    )
    Registry(file_store, "refit").add(record)
    config = small_config(init_from="imagenet:1", bucket="refit")
    with pytest.raises(StartingPointError, match="--backbone efficientnet_lite0"):
        build_model(config, file_store, list(CLASS_NAMES), BackboneRegistry())
