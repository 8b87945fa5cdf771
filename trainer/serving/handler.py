"""TorchServe handler packaged into every refit model archive.

Self-contained on purpose: it runs inside TorchServe's workers, where refit is not installed.
Each request carries ``data`` (encoded image bytes) and optionally ``top_k``; each answer is JSON,
either ``{"predictions": [{"index", "label", "score"}, ...]}`` or ``{"error": "..."}`` for an image
that cannot be decoded, so one bad image never fails the rest of a batch.
"""

from __future__ import annotations

import io
import json
import os
import platform
from collections.abc import Callable

import torch
from PIL import Image
from torch.nn.functional import interpolate, pad
from ts.torch_handler.base_handler import BaseHandler

META_FILE = "refit.json"
# The transform scales the short side to the model's resize size first: a 1x30000 image would
# become 256x7,680,000 and exhaust the worker's memory. The service refuses these first
# (service/images.py, the same limit); this guards direct callers and other front ends.
MAX_ASPECT_RATIO = 20


class RefitImageClassifier(BaseHandler):
    def initialize(self, context) -> None:
        super().initialize(context)
        model_dir = context.system_properties["model_dir"]
        with open(os.path.join(model_dir, META_FILE)) as f:
            meta = json.load(f)
        self.class_names: list[str] = meta["class_names"]
        self.transform = transform_for(meta)

    def preprocess(self, data: list[dict]) -> tuple[torch.Tensor | None, list]:
        tensors, outcomes = [], []
        for row in data:
            try:
                k = top_k(row)
            except ValueError:
                outcomes.append({"error": f"top_k must be an integer, got {row['top_k']!r}"})
                continue
            try:
                image = self.transform(decode(row.get("data") or row.get("body")))
            except Exception as exc:  # whatever Pillow raises (a bomb too), for this row alone:
                # TorchServe fails every request of a batch whose handler raises.
                outcomes.append({"error": f"cannot decode image: {exc}"})
                continue
            # Appended together: row i of the batch always answers the i-th integer outcome.
            tensors.append(image)
            outcomes.append(k)
        batch = torch.stack(tensors).to(self.device) if tensors else None
        return batch, outcomes

    def inference(self, batch: tuple[torch.Tensor | None, list], *args, **kwargs) -> tuple:
        images, outcomes = batch
        if images is None:
            return None, outcomes
        with torch.inference_mode():
            return torch.softmax(self.model(images).float(), dim=1), outcomes

    def postprocess(self, output: tuple) -> list[str]:
        probabilities, outcomes = output
        answers, row = [], 0
        for outcome in outcomes:
            if isinstance(outcome, dict):
                answers.append(json.dumps(outcome))
                continue
            k = min(outcome, len(self.class_names))
            scores, indices = probabilities[row].topk(k)
            row += 1
            predictions = [
                {"index": i, "label": self.class_names[i], "score": s}
                for s, i in zip(scores.tolist(), indices.tolist(), strict=True)
            ]
            answers.append(json.dumps({"predictions": predictions}))
        return answers


def transform_for(meta: dict) -> Callable[[Image.Image], torch.Tensor]:
    """The model's recorded preprocessing (refit.json): PIL RGB image -> normalized tensor, as
    training's evaluation transform makes it (trainer/transforms.py ``eval_transform``, with
    torchvision): resize the short side (bilinear, antialiased), center-crop (zero-padded when
    smaller), scale to [0, 1], normalize. Written with torch alone, since importing torchvision
    costs each worker about 170 MB (docs/benchmarks.md, *Memory*); tests/trainer/
    test_transforms.py holds the two equal to the bit. Functions, not a class: TorchServe wants
    exactly one class in a handler module."""
    resize_size, crop_size = meta["resize_size"], meta["crop_size"]
    mean = torch.tensor(meta["mean"], dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(meta["std"], dtype=torch.float32).view(-1, 1, 1)

    def transform(image: Image.Image) -> torch.Tensor:
        pixels = center_crop(resize(to_tensor(image), resize_size), crop_size)
        return pixels.to(torch.float32).mul_(1.0 / 255).sub_(mean).div_(std)

    return transform


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a 3xHxW uint8 tensor."""
    width, height = image.size
    raw = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return raw.view(height, width, 3).permute(2, 0, 1)


def resize(pixels: torch.Tensor, short_side: int) -> torch.Tensor:
    """The shorter side at ``short_side``, the aspect ratio kept (the longer side rounded down)."""
    height, width = pixels.shape[-2:]
    short, long = sorted((height, width))
    new_long = int(short_side * long / short)
    size = (short_side, new_long) if height <= width else (new_long, short_side)
    if size == (height, width):
        return pixels
    via_float = not native_uint8_resize()  # as torchvision does on CPUs without AVX2
    batch = pixels[None].to(torch.float32) if via_float else pixels[None]
    out = interpolate(batch, size=size, mode="bilinear", align_corners=False, antialias=True)
    return (out.round_().to(torch.uint8) if via_float else out)[0]


def native_uint8_resize() -> bool:
    """Whether torchvision resizes uint8 images without converting them to float here."""
    capable = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    return capable or platform.machine() in ("aarch64", "arm64")


def center_crop(pixels: torch.Tensor, crop: int) -> torch.Tensor:
    height, width = pixels.shape[-2:]
    if crop > height or crop > width:  # zero padding, the odd pixel after
        pad_w, pad_h = max(crop - width, 0), max(crop - height, 0)
        pixels = pad(pixels, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
        height, width = pixels.shape[-2:]
    top, left = round((height - crop) / 2.0), round((width - crop) / 2.0)
    return pixels[..., top : top + crop, left : left + crop]


def decode(data: bytes | bytearray | None) -> Image.Image:
    if not data:
        raise ValueError("empty image")
    image = Image.open(io.BytesIO(data))
    width, height = image.size  # from the header: checked before the pixels are decoded
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ValueError(
            f"image is {width}x{height} pixels, an aspect ratio over {MAX_ASPECT_RATIO}:1"
        )
    image.load()  # forces a full decode: truncated files fail here
    return image.convert("RGB")


def top_k(row: dict) -> int:
    raw = row.get("top_k")
    value = int(raw.decode() if isinstance(raw, bytes | bytearray) else raw or 5)
    return max(value, 1)
