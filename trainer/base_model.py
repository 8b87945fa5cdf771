"""Publish the base model: ImageNet EfficientNet-Lite0 as model ``imagenet``, version 1.

Idempotent: when the registry already has a default for the model, nothing is done.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from torchvision.models import EfficientNet_B0_Weights

from refit.lineage import Lineage
from refit.registry import Batching, Registry, VersionRecord
from refit.storage import ObjectStore, StorageSettings
from trainer.backbones import efficientnet_lite0_imagenet
from trainer.jobs.settings import TrainerSettings
from trainer.package import build_archive
from trainer.preprocessing import Preprocessing
from trainer.weights import save_weights, weights_key

BASE_MODEL = "imagenet"


def imagenet_classes() -> list[str]:
    """ImageNet-1k's class names, in index order: torchvision's published metadata for any
    ImageNet-1k weights (reading it downloads nothing)."""
    return list(EfficientNet_B0_Weights.IMAGENET1K_V1.meta["categories"])


def publish_base_model(
    store: ObjectStore,
    bucket: str,
    model_name: str = BASE_MODEL,
    batching: Batching | None = None,
) -> VersionRecord:
    registry = Registry(store, bucket)
    store.ensure_bucket(bucket)
    current = registry.default_version(model_name)
    if current is not None:
        return registry.get(model_name, current)
    version = registry.next_version(model_name)
    class_names = imagenet_classes()
    model = efficientnet_lite0_imagenet()
    with tempfile.TemporaryDirectory() as tmp:
        archive = build_archive(
            model,
            model_name=model_name,
            version=version,
            class_names=class_names,
            preprocessing=Preprocessing(),
            metadata={"backbone": "efficientnet_lite0"},
            out_dir=Path(tmp),
        )
        key = Registry.archive_key(model_name, archive.digest)
        store.put_file(bucket, key, archive.path)
    # Plain weights too, so training can continue from this version (--base-version).
    weights = weights_key(model_name, archive.digest)
    save_weights(
        store,
        bucket,
        weights,
        backbone="efficientnet_lite0",
        class_names=class_names,
        state_dict=model.state_dict(),
    )
    record = VersionRecord(
        model=model_name,
        version=version,
        archive_key=key,
        class_names=class_names,
        lineage=Lineage(
            backbone="efficientnet_lite0",
            dataset_uri="imagenet-1k (pretrained)",
            weights_key=weights,
        ),
        batching=batching or Batching(),
    )
    registry.add(record)
    registry.set_default(model_name, version)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bucket", default="refit")
    parser.add_argument("--model", default=BASE_MODEL)
    args = parser.parse_args(argv)
    batching = TrainerSettings.from_env().batching
    record = publish_base_model(
        StorageSettings.from_env().open(), args.bucket, args.model, batching
    )
    print(f"{record.model} v{record.version}: {record.archive_key}")


if __name__ == "__main__":
    main()
