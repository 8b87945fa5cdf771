"""A Retrain request (its proto JSON form) in the engine's terms: the training config, and how
the new version is served. Zero values stand for the defaults; admission.py checks the ranges."""

from __future__ import annotations

from dataclasses import replace

from refit.identifiers import check_model_name
from refit.registry import Batching
from refit.storage import S3Uri
from trainer.config import TrainConfig
from trainer.jobs.settings import TrainerSettings


def train_config(request: dict, settings: TrainerSettings, *, job_id: str = "",
                 version: str | None = None) -> TrainConfig:  # fmt: skip
    """The engine's config for a RetrainRequest (proto JSON form); zero values: defaults."""
    model = check_model_name(request.get("model", ""))
    dataset = request.get("dataset_uri", "")
    S3Uri.parse(dataset)  # ValueError names the expected form
    hp = request.get("hyperparameters", {})
    defaults = TrainConfig(dataset=dataset, out=model)
    base = request.get("base_version", "")
    return replace(
        defaults,
        backbone=request.get("backbone") or defaults.backbone,
        init_from=f"{model}:{base}" if base else None,
        freeze=int(hp["freeze"]) if "freeze" in hp else None,
        epochs=int(hp.get("epochs") or 0) or None,  # None: the recipe's (trainer/recipe.py)
        head_epochs=int(hp.get("head_epochs") or 0),
        batch_size=int(hp.get("batch_size") or 0) or None,
        lr=float(hp.get("lr") or defaults.lr),
        patience=int(hp["patience"]) if "patience" in hp else None,
        crop_size=int(hp.get("crop_size") or 0) or None,
        val_fraction=float(hp.get("val_fraction") or defaults.val_fraction),
        seed=int(hp.get("seed") or 0),
        workers=settings.loader_workers,
        device=settings.device,
        bucket=settings.bucket,
        weights_uri=settings.weights_uri,
        version=version,
        run_id=job_id or None,
        resume=True,
        checkpoint_interval_s=settings.checkpoint_interval_s,
        log_every=1,  # every batch reaches the sink: TRAINING starts at the first one
        precision=precision_for(request),
        int8_max_drop=settings.int8_max_drop,
    )


def precision_for(request: dict) -> str:
    """Serve fp32 when the request asks for it, else "auto": int8 when it costs no accuracy."""
    asked = request.get("precision", "PRECISION_UNSPECIFIED")
    if asked == "PRECISION_INT8":
        raise ValueError("precision: int8 is served only when it costs no accuracy; leave "
                         "precision unset for that, or ask for PRECISION_FP32")  # fmt: skip
    return "fp32" if asked == "PRECISION_FP32" else "auto"


def batching_for(request: dict, settings: TrainerSettings) -> Batching:
    """How the new version is served: the request's values, its zero ones the trainer's."""
    asked, default = request.get("batching", {}), settings.batching
    return Batching(
        batch_size=int(asked.get("batch_size") or default.batch_size),
        max_batch_delay_ms=int(asked.get("max_batch_delay_ms") or default.max_batch_delay_ms),
    )
