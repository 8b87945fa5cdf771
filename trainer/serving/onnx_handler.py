"""TorchServe handler for refit archives whose model is ONNX (fp32 or int8): ONNX Runtime runs it
inside TorchServe's worker. Archives made before keep trainer/serving/handler.py (TorchScript).

Self-contained on purpose: it runs inside TorchServe's workers, where refit is not installed.
Requests and answers are the TorchScript handler's: ``data`` (encoded image bytes) and optionally
``top_k``; each answer is ``{"predictions": [{"index", "label", "score"}, ...]}`` or
``{"error": "..."}`` for that row alone. Preprocessing is Pillow and numpy: single-threaded, so
it keeps its 3-4 ms per photo when workers share busy cores, where torch's thread pool varied
3-32 ms (docs/benchmarks.md, *Serving format*); it equals training's evaluation transform to one
8-bit level (tests/trainer/serving/test_onnx_preprocessing.py).
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import onnxruntime as ort
from PIL import Image
from ts.torch_handler.base_handler import BaseHandler

META_FILE = "refit.json"
MAX_ASPECT_RATIO = 20  # as the TorchScript handler and service/images.py: see handler.py
THREADS_ENV = "REFIT_ORT_THREADS"  # ONNX Runtime threads per worker; unset: cores // workers


class RefitOnnxClassifier(BaseHandler):
    def initialize(self, context) -> None:
        # Not BaseHandler.initialize: its session takes one thread per core in every worker.
        properties = context.system_properties
        self.manifest = context.manifest
        model_dir = properties["model_dir"]
        with open(os.path.join(model_dir, META_FILE)) as f:
            meta = json.load(f)
        self.class_names: list[str] = meta["class_names"]
        self.resize_size: int = meta["resize_size"]
        self.crop_size: int = meta["crop_size"]
        self.mean = np.asarray(meta["mean"], dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(meta["std"], dtype=np.float32).reshape(3, 1, 1)
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads(workers_of(context))
        options.inter_op_num_threads = 1  # one sequential graph per batch
        path = os.path.join(model_dir, self.manifest["model"]["serializedFile"])
        self.model = ort.InferenceSession(path, options, providers=providers(properties))
        self.input_name = self.model.get_inputs()[0].name
        self.initialized = True

    def preprocess(self, data: list[dict]) -> tuple[np.ndarray | None, list]:
        arrays, outcomes = [], []
        for row in data:
            try:
                k = top_k(row)
            except ValueError:
                outcomes.append({"error": f"top_k must be an integer, got {row['top_k']!r}"})
                continue
            try:
                image = decode(row.get("data") or row.get("body"), self.resize_size)
                pixels = resize_and_crop(image, self.resize_size, self.crop_size)
            except Exception as exc:  # whatever Pillow raises (a bomb too), for this row alone:
                # TorchServe fails every request of a batch whose handler raises.
                outcomes.append({"error": f"cannot decode image: {exc}"})
                continue
            # Appended together: row i of the batch always answers the i-th integer outcome.
            arrays.append(pixels)
            outcomes.append(k)
        if not arrays:
            return None, outcomes
        batch = np.stack(arrays).transpose(0, 3, 1, 2).astype(np.float32)
        batch *= 1.0 / 255
        return (batch - self.mean) / self.std, outcomes

    def inference(self, batch: tuple[np.ndarray | None, list], *args, **kwargs) -> tuple:
        images, outcomes = batch
        if images is None:
            return None, outcomes
        logits = self.model.run(None, {self.input_name: images})[0].astype(np.float64)
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32), outcomes

    def postprocess(self, output: tuple) -> list[str]:
        probabilities, outcomes = output
        answers, row = [], 0
        for outcome in outcomes:
            if isinstance(outcome, dict):
                answers.append(json.dumps(outcome))
                continue
            k = min(outcome, len(self.class_names))
            scores = probabilities[row]
            row += 1
            indices = np.argsort(-scores, kind="stable")[:k]
            predictions = [
                {"index": int(i), "label": self.class_names[i], "score": float(scores[i])}
                for i in indices
            ]
            answers.append(json.dumps({"predictions": predictions}))
        return answers


def providers(properties: dict) -> list:
    """CUDA first when TorchServe gave this worker a GPU and ONNX Runtime has CUDA (the
    onnxruntime-gpu wheel), the CPU always as the fallback for what CUDA lacks."""
    gpu = properties.get("gpu_id")
    if gpu is not None and "CUDAExecutionProvider" in ort.get_available_providers():
        return [("CUDAExecutionProvider", {"device_id": int(gpu)}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def workers_of(context) -> int:
    """This model's workers, when its model-config.yaml says (refit registers one per version)."""
    config = getattr(context, "model_yaml_config", None) or {}
    return max(int(config.get("minWorkers", 1)), 1)


def intra_op_threads(workers: int, env: dict | None = None) -> int:
    """``REFIT_ORT_THREADS`` when set, else the usable cores shared by the model's workers: with
    one thread per core in every worker, workers on one host fight over the cores."""
    env = os.environ if env is None else env
    if env.get(THREADS_ENV):
        return max(int(env[THREADS_ENV]), 1)
    return max(usable_cores() // max(workers, 1), 1)


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota (a
    container's CPU limit)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        if quota != "max":
            cores = min(cores or 1, max(int(quota) // int(period), 1))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota: the affinity is the limit
    return max(cores or 1, 1)


def decode(data: bytes | bytearray | None, resize_size: int) -> Image.Image:
    """The image in RGB. A JPEG whose short side is at least twice ``resize_size`` is decoded at
    1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, "draft" mode), never below ``resize_size``:
    much cheaper than decoding every pixel and resizing them after."""
    if not data:
        raise ValueError("empty image")
    image = Image.open(io.BytesIO(data))
    width, height = image.size  # from the header: checked before the pixels are decoded
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ValueError(
            f"image is {width}x{height} pixels, an aspect ratio over {MAX_ASPECT_RATIO}:1"
        )
    if image.format == "JPEG" and min(width, height) >= 2 * resize_size:
        # Pillow picks the largest scale that keeps both sides at least the size asked for.
        image.draft("RGB", (resize_size, resize_size))
    image.load()  # forces a full decode: truncated files fail here
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_and_crop(image: Image.Image, resize_size: int, crop_size: int) -> np.ndarray:
    """HxWx3 uint8: the short side resized to ``resize_size`` (bilinear, antialiased, the long
    side rounded down) and the centre ``crop_size`` square (zero-padded when smaller), as
    torchvision's Resize and CenterCrop do."""
    width, height = image.size
    short, long = sorted((width, height))
    new_long = int(resize_size * long / short)
    size = (resize_size, new_long) if width <= height else (new_long, resize_size)
    if size != (width, height):
        image = image.resize(size, Image.Resampling.BILINEAR)
    pixels = np.asarray(image)
    height, width = pixels.shape[:2]
    pad_h, pad_w = max(crop_size - height, 0), max(crop_size - width, 0)
    if pad_h or pad_w:  # the odd pixel after, as torchvision pads
        pad = ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0))
        pixels = np.pad(pixels, pad)
        height, width = pixels.shape[:2]
    top, left = round((height - crop_size) / 2.0), round((width - crop_size) / 2.0)
    return pixels[top : top + crop_size, left : left + crop_size]


def top_k(row: dict) -> int:
    raw = row.get("top_k")
    value = int(raw.decode() if isinstance(raw, bytes | bytearray) else raw or 5)
    return max(value, 1)
