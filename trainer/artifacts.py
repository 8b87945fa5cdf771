"""What a finished run leaves in the object store, and the result that describes it: the archive
(content-addressed; ONNX, fp32 or int8: trainer/serving_model.py), the plain weights beside it
(a later run may start from them), and a ``TrainResult`` with the version's metrics, precision
and lineage for the registry."""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from refit.lineage import Lineage
from refit.registry import Registry
from refit.storage import ObjectStore
from trainer.config import TrainConfig
from trainer.datasets import Datasets
from trainer.finetune import FineTuneModel
from trainer.loop import FitResult
from trainer.package import package
from trainer.precision import FP32
from trainer.preprocessing import Preprocessing
from trainer.serving_model import ServingModel, prepare_serving_model
from trainer.weights import save_weights, weights_key


@dataclass(frozen=True)
class TrainResult:
    """Everything the service needs to register the new version."""

    model: str
    version: str
    archive_key: str
    archive_digest: str
    weights_key: str
    class_names: list[str]
    metrics: dict[str, float]
    lineage: Lineage
    evaluation: dict  # best epoch: per-class accuracy and confusion matrix
    history: list[dict]
    precision: str = FP32  # served (trainer/precision.py)
    fp32_accuracy: float | None = None  # of the ONNX models on the validation split
    int8_accuracy: float | None = None

    def to_dict(self) -> dict:
        return {**asdict(self), "lineage": self.lineage.to_dict()}

    @classmethod
    def from_dict(cls, fields: dict) -> TrainResult:
        return cls(**{**fields, "lineage": Lineage.from_dict(fields["lineage"])})


@dataclass(frozen=True)
class TrainedModel:
    """A fitted model with what packaging needs to know about it."""

    model: FineTuneModel
    class_names: list[str]
    fit: FitResult
    lineage: Lineage  # all but the weights key, known once they are stored
    preprocessing: Preprocessing
    # Both splits through the evaluation transform, unsharded: the export check, the int8
    # calibration (train) and the fp32/int8 accuracies (val). None: checked on probes only.
    checks: Datasets | None = None

    def metrics(self) -> dict[str, float]:
        fit = self.fit
        return {
            "val_accuracy": fit.best.accuracy,
            "val_loss": fit.best.loss,
            "best_epoch": float(fit.best_epoch),
            "epochs_run": float(fit.epochs_run),
            "train_seconds": fit.train_seconds,
            "images_per_second": fit.images_per_second,
        }

    def archive_metadata(self) -> dict:
        """refit.json's fields beside the class names and preprocessing."""
        lineage = self.lineage
        return {
            "backbone": lineage.backbone,
            "frozen_depth": lineage.frozen_depth,
            "dataset": {
                "uri": lineage.dataset_uri,
                "objects": lineage.dataset_objects,
                "digest": lineage.dataset_digest,
            },
            "hyperparameters": lineage.hyperparameters,
            "metrics": self.metrics(),
            "start": lineage.start,
        }


def store_artifacts(trained: TrainedModel, config: TrainConfig, store: ObjectStore) -> TrainResult:
    """Export, package and store the archive, then the weights; the version is the config's or
    the registry's next."""
    version = config.version or Registry(store, config.bucket).next_version(config.out)
    trained.model.eval().cpu()
    with tempfile.TemporaryDirectory() as tmp:
        served = prepare_serving_model(
            trained.model, trained.preprocessing.crop_size, Path(tmp),
            val=trained.checks.val if trained.checks else None,
            train=trained.checks.train if trained.checks else None,
            precision=config.precision, int8_max_drop_points=config.int8_max_drop,
        )  # fmt: skip
        archive_key, digest = _store_archive(trained, served, config, store, version)
    w_key = weights_key(config.out, digest)
    save_weights(
        store,
        config.bucket,
        w_key,
        backbone=trained.lineage.backbone,
        class_names=trained.class_names,
        state_dict=trained.model.net.state_dict(),
    )
    return TrainResult(
        model=config.out,
        version=version,
        archive_key=archive_key,
        archive_digest=digest,
        weights_key=w_key,
        class_names=trained.class_names,
        metrics={**trained.metrics(), **_serving_metrics(served)},
        lineage=replace(trained.lineage, weights_key=w_key),
        evaluation=trained.fit.best.as_dict(trained.class_names),
        history=trained.fit.history,
        precision=served.choice.precision,
        fp32_accuracy=served.choice.fp32_accuracy,
        int8_accuracy=served.choice.int8_accuracy,
    )


def _serving_metrics(served: ServingModel) -> dict[str, float]:
    check = served.export_check
    seconds = {f"{step}_seconds": value for step, value in served.seconds.items()}
    return {"export_top1_agreement": check["top1_agreement"],
            "export_max_probability_diff": check["max_probability_diff"], **seconds}  # fmt: skip


def _store_archive(
    trained: TrainedModel,
    served: ServingModel,
    config: TrainConfig,
    store: ObjectStore,
    version: str,
) -> tuple[str, str]:
    """(object key, sha256) of the stored archive."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = package(
            served.exported,
            model_name=config.out,
            version=version,
            class_names=trained.class_names,
            preprocessing=trained.preprocessing,
            metadata={
                **trained.archive_metadata(),
                "serving": {**served.choice.as_dict(), "export_check": served.export_check},
            },
            out_dir=Path(tmp),
        )
        key = Registry.archive_key(config.out, archive.digest)
        store.put_file(config.bucket, key, archive.path)
    return key, archive.digest
