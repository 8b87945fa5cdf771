"""Backbone registry: heads, units, and where ImageNet weights come from (store, cache, error)."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from skimage import data as skdata

from refit.storage import FileStore
from trainer.backbones import (
    BackboneRegistry,
    BackboneWeightsMissing,
    UnknownBackbone,
    WeightsSource,
    build_backbone,
    efficientnet_lite0_imagenet,
)
from trainer.preprocessing import Preprocessing
from trainer.transforms import eval_transform

TORCHVISION = ["resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny"]


def test_registry_holds_the_supported_backbones() -> None:
    assert BackboneRegistry().names() == sorted(["efficientnet_lite0", *TORCHVISION])


def test_unknown_backbone_lists_the_known_ones() -> None:
    with pytest.raises(UnknownBackbone, match="resnet18") as err:
        BackboneRegistry().get("vgg16")
    assert "vgg16" in err.value.message


@pytest.mark.parametrize("name", ["efficientnet_lite0", *TORCHVISION])
def test_new_head_matches_the_class_count(name: str) -> None:
    spec = BackboneRegistry().get(name)
    net = build_backbone(spec, 7, pretrained=False, weights=WeightsSource()).eval()
    with torch.inference_mode():
        assert net(torch.rand(2, 3, 64, 64)).shape == (2, 7)
    assert net.get_submodule(spec.head).out_features == 7
    assert 0 <= spec.default_freeze < spec.num_units(net)
    # the units and the head together cover every parameter except small head extras
    covered = {id(p) for unit in spec.units(net) for p in unit.parameters()}
    covered |= {id(p) for p in net.get_submodule(spec.head).parameters()}
    assert len(covered) >= 0.9 * len(list(net.parameters()))


def _random_resnet18_state() -> dict:
    return BackboneRegistry().get("resnet18").build().state_dict()


def test_torchvision_weights_come_from_the_object_store(file_store: FileStore) -> None:
    state = _random_resnet18_state()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    file_store.ensure_bucket("weights")
    file_store.put("weights", "imagenet/resnet18.pth", buffer.getvalue())
    source = WeightsSource(store=file_store, uri="s3://weights/imagenet")
    net = build_backbone(BackboneRegistry().get("resnet18"), 3, pretrained=True, weights=source)
    assert torch.equal(net.conv1.weight, state["conv1.weight"])
    assert torch.equal(net.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    assert net.fc.out_features == 3


def test_torchvision_weights_come_from_the_local_cache(tmp_path) -> None:
    state = _random_resnet18_state()
    torch.save(state, tmp_path / "resnet18-f37072fd.pth")  # torchvision's cache file name
    source = WeightsSource(store=None, cache_dir=tmp_path)
    net = build_backbone(BackboneRegistry().get("resnet18"), 3, pretrained=True, weights=source)
    assert torch.equal(net.conv1.weight, state["conv1.weight"])


def test_missing_weights_name_the_object_the_file_and_the_fix(file_store, tmp_path) -> None:
    source = WeightsSource(store=file_store, cache_dir=tmp_path)
    file_store.ensure_bucket("models")
    with pytest.raises(BackboneWeightsMissing) as err:
        build_backbone(BackboneRegistry().get("convnext_tiny"), 3, pretrained=True, weights=source)
    message = err.value.message
    assert "s3://models/backbones/convnext_tiny.pth" in message
    assert str(tmp_path / "convnext_tiny-983f1562.pth") in message
    assert "https://download.pytorch.org/models/convnext_tiny-983f1562.pth" in message


def test_efficientnet_lite0_imagenet_still_recognises_espresso() -> None:
    model = efficientnet_lite0_imagenet().eval()
    image = eval_transform(Preprocessing())(Image.fromarray(skdata.coffee()))
    with torch.inference_mode():
        probabilities = model(image[None]).softmax(1)[0]
    assert probabilities.argmax().item() == 967  # espresso
