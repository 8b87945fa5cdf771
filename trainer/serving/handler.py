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

import torch
from PIL import Image
from torchvision.transforms import v2
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


def transform_for(meta: dict) -> v2.Compose:
    """The model's recorded preprocessing (refit.json): PIL image -> normalized tensor."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(meta["resize_size"], antialias=True),
            v2.CenterCrop(meta["crop_size"]),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(meta["mean"], meta["std"]),
        ]
    )


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
