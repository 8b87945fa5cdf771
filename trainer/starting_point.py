"""The model a run starts from: an ImageNet (or random) backbone with a new head, or a published
version's weights, and the lineage that says which."""

from __future__ import annotations

from refit.lineage import Lineage, Parent
from refit.registry import Registry
from refit.storage import ObjectStore
from trainer.backbones import (
    BackboneError,
    BackboneRegistry,
    WeightsSource,
    build_backbone,
    replace_head,
)
from trainer.config import TrainConfig
from trainer.finetune import FineTuneModel
from trainer.weights import load_weights


class StartingPointError(BackboneError):
    pass


def build_model(
    config: TrainConfig,
    store: ObjectStore,
    class_names: list[str],
    backbones: BackboneRegistry,
) -> tuple[FineTuneModel, Lineage]:
    """The model to fine-tune, and its lineage so far (backbone, start, parent)."""
    if config.init_from is not None:
        return from_published(config, store, class_names, backbones)
    spec = backbones.get(config.backbone)
    source = WeightsSource(store=store, uri=config.weights_uri)
    net = build_backbone(spec, len(class_names), pretrained=config.pretrained, weights=source)
    start = "imagenet" if config.pretrained else "random"
    return FineTuneModel(net, spec), Lineage(backbone=spec.name, start=start)


def from_published(
    config: TrainConfig,
    store: ObjectStore,
    class_names: list[str],
    backbones: BackboneRegistry,
) -> tuple[FineTuneModel, Lineage]:
    """``config.init_from``'s stored weights; a new head when the classes differ."""
    model_name, version = config.init_from.split(":", 1)
    record = Registry(store, config.bucket).get(model_name, version)
    key = record.lineage.weights_key
    if not key:
        raise StartingPointError(
            f"{model_name} v{version} has no weights object in its lineage (it was not trained "
            "by refit train); start from its backbone instead: --backbone "
            f"{record.lineage.backbone or 'efficientnet_lite0'}"
        )
    saved = load_weights(store, config.bucket, key)
    spec = backbones.get(saved["backbone"])
    net = spec.build()
    replace_head(net, spec, len(saved["class_names"]))
    net.load_state_dict(saved["state_dict"])
    if list(saved["class_names"]) != list(class_names):
        replace_head(net, spec, len(class_names))  # other classes: only the body carries over
    lineage = Lineage(
        backbone=spec.name,
        start=f"{model_name}:{version}",
        parent=Parent(model=model_name, version=version, weights_key=key),
    )
    return FineTuneModel(net, spec), lineage
