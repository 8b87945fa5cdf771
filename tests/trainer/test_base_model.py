"""The base model: published once, with an archive and plain weights to continue from."""

from __future__ import annotations

import torch

from refit.registry import Registry
from refit.storage import FileStore
from trainer.backbones import BackboneRegistry, efficientnet_lite0_imagenet
from trainer.base_model import imagenet_classes, publish_base_model
from trainer.config import TrainConfig
from trainer.starting_point import from_published


def test_publish_is_idempotent_and_continuable(file_store: FileStore) -> None:
    record = publish_base_model(file_store, "refit")
    assert publish_base_model(file_store, "refit") == record  # second call: nothing new
    registry = Registry(file_store, "refit")
    assert registry.default_version("imagenet") == "1"
    assert file_store.stat("refit", record.archive_key) is not None
    assert file_store.stat("refit", record.lineage.weights_key) is not None

    config = TrainConfig(dataset="s3://unused/x", out="birds", init_from="imagenet:1")
    imagenet = imagenet_classes()
    model, lineage = from_published(config, file_store, imagenet, BackboneRegistry())
    assert lineage.start == "imagenet:1"
    probe = torch.rand(1, 3, 224, 224)
    with torch.inference_mode():
        same = model.eval()(probe), efficientnet_lite0_imagenet().eval()(probe)
    assert torch.allclose(*same, atol=1e-4)  # same classes: the whole network carries over
    model, _ = from_published(config, file_store, ["a", "b"], BackboneRegistry())
    assert model.eval()(probe).shape == (1, 2)  # other classes: a new head
