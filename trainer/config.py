"""Fine-tuning configuration and its command-line form. No torch import: ``refit train --help``
stays fast and the CLI builds its parser from here."""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import asdict, dataclass, fields

NO_FREEZE = -1  # mirrors trainer.finetune.NO_FREEZE without importing torch
CROP_RATIO = 0.875  # resize = crop / this unless set: torchvision's evaluation convention


@dataclass(frozen=True)
class Augmentation:
    crop_scale: tuple[float, float] = (0.85, 1.0)  # RandomResizedCrop area range; (1, 1): no crop
    hflip: float = 0.5  # probability
    rotation: float = 0.0  # max degrees either way
    translate: float = 0.0  # max shift either way, as a fraction of the image size
    color_jitter: float = 0.0  # brightness/contrast/saturation strength; 0: off
    mixup: float = 0.0  # MixUp's Beta(alpha, alpha) over each batch; 0: off
    cutmix: float = 0.0  # CutMix's alpha; with mixup too, each batch gets one of the two
    trivial_augment: bool = False  # TrivialAugmentWide: one random op at a random strength
    erasing: float = 0.0  # RandomErasing probability; 0: off

    def __post_init__(self) -> None:
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if not 0 <= self.hflip <= 1:
            raise ValueError(f"hflip is a probability, got {self.hflip}")
        if not 0 <= self.translate < 1:
            raise ValueError(f"translate is a fraction of the size in [0, 1), got {self.translate}")
        if not 0 <= self.erasing <= 1:
            raise ValueError(f"erasing is a probability, got {self.erasing}")
        if self.mixup < 0 or self.cutmix < 0:
            raise ValueError(f"mixup and cutmix are alphas >= 0, got {self.mixup}, {self.cutmix}")


@dataclass(frozen=True)
class TrainConfig:
    dataset: str  # s3://bucket/prefix
    out: str  # model name of the result
    backbone: str = "efficientnet_lite0"
    init_from: str | None = None  # "MODEL:VERSION" of a published model to continue from
    pretrained: bool = True  # False: random init (the from-scratch baseline)
    freeze: int | None = None  # stem + first K units frozen; -1 none; None: the recipe's
    # None below: chosen from the dataset by the default recipe (trainer/recipe.py)
    epochs: int | None = None
    head_epochs: int = 0  # > 0: two phases, head only first, then unfreeze down to `freeze`
    finetune_lr_scale: float = 0.1  # phase-two LR = lr * this
    batch_size: int | None = None
    lr: float = 2e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    ema_decay: float = 0.0  # > 0: validate, keep and serve an exponential average of the weights
    patience: int | None = None  # early stopping: epochs without val-accuracy gain
    crop_size: int | None = None
    resize_size: int | None = None  # None: crop_size / 0.875 (or the recipe's)
    augmentation: Augmentation | None = None
    val_fraction: float = 0.2
    seed: int = 0
    workers: int | None = None  # DataLoader processes; None: chosen for the host (hardware.py)
    device: str = "auto"  # auto | cpu | cuda
    channels_last: bool | None = None  # None: on (faster on CUDA and CPU)
    bucket: str = "refit"  # archives, weights and checkpoints go here
    weights_uri: str = "s3://models/backbones/"  # torchvision ImageNet weights: <uri>/<name>.pth
    version: str | None = None  # archive version; None: the registry's next version
    run_id: str | None = None  # checkpoint folder; None: derived from config + dataset digest
    resume: bool = True
    log_every: int = 10  # batches between progress events
    checkpoint_interval_s: float = 600.0  # also checkpoint within an epoch this often; 0: never
    precision: str = "auto"  # auto: int8 served when it costs no accuracy (precision.py); fp32
    int8_max_drop: float = 0.3  # accuracy points int8 may lose on the val split and be served

    def __post_init__(self) -> None:
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"need epochs >= 1, got {self.epochs}")
        if self.head_epochs < 0 or self.head_epochs > (self.epochs or self.head_epochs):
            raise ValueError("need 0 <= head_epochs <= epochs")
        if (self.batch_size is not None and self.batch_size < 1) or self.lr <= 0:
            raise ValueError("batch_size and lr must be positive")
        if self.crop_size is not None and self.crop_size < 1:
            raise ValueError(f"crop_size must be positive, got {self.crop_size}")
        if self.freeze is not None and self.freeze < NO_FREEZE:
            raise ValueError(f"freeze must be >= {NO_FREEZE}, got {self.freeze}")
        if self.init_from is not None and ":" not in self.init_from:
            raise ValueError(f"init_from is MODEL:VERSION, got {self.init_from!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.checkpoint_interval_s < 0:
            raise ValueError(f"checkpoint_interval_s must be >= 0: {self.checkpoint_interval_s}")
        if self.precision not in ("auto", "fp32"):
            raise ValueError(f"precision must be 'auto' or 'fp32', got {self.precision!r}")
        if self.int8_max_drop < 0:
            raise ValueError(f"int8_max_drop must be >= 0 points, got {self.int8_max_drop}")

    @property
    def complete(self) -> bool:
        """Nothing left to the recipe (trainer.recipe.complete fills it in)."""
        chosen = (self.freeze, self.epochs, self.batch_size, self.crop_size, self.augmentation)
        return None not in chosen

    @property
    def eval_resize(self) -> int:
        assert self.crop_size is not None, "complete the config first (trainer.recipe)"
        return self.resize_size or round(self.crop_size / CROP_RATIO)

    def hyperparameters(self) -> dict:
        keys = (
            "epochs",
            "head_epochs",
            "finetune_lr_scale",
            "batch_size",
            "lr",
            "weight_decay",
            "label_smoothing",
            "ema_decay",
            "patience",
            "crop_size",
            "val_fraction",
            "seed",
        )
        params = {k: getattr(self, k) for k in keys}
        params["resize_size"] = self.eval_resize if self.crop_size else self.resize_size
        params["augmentation"] = asdict(self.augmentation) if self.augmentation else None
        return params

    def fingerprint(self, dataset_digest: str) -> str:
        """Same config on the same data -> same run id, so a rerun resumes its checkpoint."""
        fields = asdict(self)
        volatile = ("run_id", "resume", "workers", "log_every", "device", "version",
                    "checkpoint_interval_s", "precision", "int8_max_drop")  # fmt: skip
        for name in volatile:
            fields.pop(name)
        blob = json.dumps([fields, dataset_digest], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def parse_freeze(text: str) -> int | None:
    if text == "default":
        return None
    if text == "none":
        return NO_FREEZE
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    a = parser.add_argument
    a("--dataset", required=True, help="s3://BUCKET/PREFIX of the labelled images")
    a("--out", required=True, help="model name of the result")
    a("--backbone", default="efficientnet_lite0")
    a(
        "--from",
        dest="init_from",
        default=None,
        metavar="MODEL:VERSION",
        help="continue from a published model version instead of an ImageNet backbone",
    )
    a("--scratch", action="store_true", help="random init instead of pretrained weights")
    a(
        "--freeze",
        type=parse_freeze,
        default=None,
        help="units frozen above the stem (int), 'none' or 'default' (the recipe's: none for "
        "much upscaled images, else the backbone's)",
    )
    a("--epochs", type=int, default=None, help="default: by the training set's size")
    a("--head-epochs", type=int, default=0, help="head-only epochs before unfreezing")
    a("--finetune-lr-scale", type=float, default=0.1)
    a("--batch-size", type=int, default=None, help="default: by the training set's size")
    a("--lr", type=float, default=2e-3)
    a("--weight-decay", type=float, default=0.05)
    a("--label-smoothing", type=float, default=0.1)
    a("--ema-decay", type=float, default=0.0, help="keep an EMA of the weights (0: off)")
    a("--patience", type=int, default=None)
    a("--crop-size", type=int, default=None, help="input size; default: by the images' size")
    a("--resize-size", type=int, default=None)
    augment = parser.add_argument_group(
        "augmentation",
        "default: the recipe's for the dataset (trainer/recipe.py); any of these "
        "flags starts from Augmentation's defaults instead",
    ).add_argument
    augment("--crop-scale", type=float, nargs=2, default=None)
    augment("--hflip", type=float, default=None)
    augment("--rotation", type=float, default=None)
    augment("--translate", type=float, default=None, help="max shift, fraction of the size")
    augment("--color-jitter", type=float, default=None)
    augment("--mixup", type=float, default=None, help="MixUp alpha (0: off)")
    augment("--cutmix", type=float, default=None, help="CutMix alpha (0: off)")
    augment(
        "--trivial-augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="TrivialAugmentWide: one random photometric or geometric op per image",
    )
    augment("--erasing", type=float, default=None, help="RandomErasing probability (0: off)")
    a("--val-fraction", type=float, default=0.2)
    a("--seed", type=int, default=0)
    a("--workers", type=int, default=None, help="DataLoader processes (default: by host)")
    a("--device", default="auto", choices=("auto", "cpu", "cuda"))
    a("--no-channels-last", dest="channels_last", action="store_false", default=None)
    a("--bucket", default="refit", help="bucket for archives, weights and checkpoints")
    a("--weights-uri", default="s3://models/backbones/")
    a("--version", default=None)
    a("--run-id", default=None)
    a("--no-resume", dest="resume", action="store_false")
    a(
        "--checkpoint-interval-s",
        type=float,
        default=600.0,
        help="also checkpoint within a long epoch this often (seconds; 0: at epoch ends only)",
    )
    a(
        "--precision",
        default="auto",
        choices=("auto", "fp32"),
        help="auto: serve int8 when it costs at most --int8-max-drop points of val accuracy",
    )
    a("--int8-max-drop", type=float, default=0.3, help="accuracy points int8 may lose")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        dataset=args.dataset,
        out=args.out,
        backbone=args.backbone,
        init_from=args.init_from,
        pretrained=not args.scratch,
        freeze=args.freeze,
        epochs=args.epochs,
        head_epochs=args.head_epochs,
        finetune_lr_scale=args.finetune_lr_scale,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing,
        ema_decay=args.ema_decay,
        patience=args.patience,
        crop_size=args.crop_size,
        resize_size=args.resize_size,
        augmentation=_augmentation_from_args(args),
        val_fraction=args.val_fraction,
        seed=args.seed,
        workers=args.workers,
        device=args.device,
        channels_last=args.channels_last,
        bucket=args.bucket,
        weights_uri=args.weights_uri,
        version=args.version,
        run_id=args.run_id,
        resume=args.resume,
        checkpoint_interval_s=args.checkpoint_interval_s,
        precision=args.precision,
        int8_max_drop=args.int8_max_drop,
    )


def _augmentation_from_args(args: argparse.Namespace) -> Augmentation | None:
    """None (the recipe's) unless a flag is given; then the given ones over the defaults."""
    given = {
        f.name: getattr(args, f.name)
        for f in fields(Augmentation)  # each field has its flag
        if getattr(args, f.name) is not None
    }
    if "crop_scale" in given:
        given["crop_scale"] = tuple(given["crop_scale"])
    return Augmentation(**given) if given else None
