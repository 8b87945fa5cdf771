"""How an image becomes the model's input: resize, centre crop, normalise. Recorded in every
archive (refit.json) for the serving handler, and used by training's evaluation transform, so
the accuracy measured at validation is the accuracy served. Torch-free: transforms and the
promotion gate import it without pulling in TorchServe's archiver."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from trainer.config import CROP_RATIO, TrainConfig


@dataclass(frozen=True)
class Preprocessing:
    resize_size: int = 256
    crop_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @classmethod
    def for_config(cls, config: TrainConfig) -> Preprocessing:
        return cls(resize_size=config.eval_resize, crop_size=config.crop_size)

    @classmethod
    def from_hyperparameters(cls, params: Mapping, default_crop: int) -> Preprocessing:
        """A version's own, from the hyperparameters in its lineage."""
        crop = int(params.get("crop_size", default_crop))
        return cls(resize_size=int(params.get("resize_size", round(crop / CROP_RATIO))),
                   crop_size=crop)  # fmt: skip
