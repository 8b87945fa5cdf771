"""The serving format's costs and effects (issue 25), on the base model (EfficientNet-Lite0,
ImageNet, 224 px), in one process on the CPU:

- export and int8 quantization time (calibration: 64 random images, for timing only);
- forward ms per image at batch 1 and 8: TorchScript (archives before), ONNX Runtime fp32 and
  int8, each with ``--threads`` threads;
- preprocessing ms per image: the TorchScript handler's (torch) and the ONNX handler's (Pillow and
  numpy), on scikit-image's photos;
- JPEG draft decoding: scikit-image's photos upscaled 2-6x (Lanczos, JPEG quality 90), each
  decoded whole and in draft mode by the ONNX handler: top-1 agreement, largest probability
  difference, and decode-plus-preprocess time.

    PYTHONPATH=. .venv/bin/python bench/serving_format.py --threads 2
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data

from trainer.backbones import efficientnet_lite0_imagenet
from trainer.onnx_export import export_onnx, probabilities, session
from trainer.package import export_torchscript
from trainer.preprocessing import Preprocessing
from trainer.quantize import quantize_int8
from trainer.serving import handler as torchscript_handler
from trainer.serving import onnx_handler

PHOTOS = ("coffee", "chelsea", "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry",
          "retina")  # fmt: skip
SCALES = (2, 3, 4, 6)


def ms_per_call(call: Callable[[], object], repeats: int) -> float:
    call()
    call()  # warm
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def photos() -> dict[str, Image.Image]:
    found = {}
    for name in PHOTOS:
        pixels = getattr(data, name)()
        if pixels.ndim == 2:
            pixels = np.stack([pixels] * 3, axis=-1)
        found[name] = Image.fromarray(pixels[..., :3].astype(np.uint8))
    return found


def forward_ms(model: torch.nn.Module, work: Path, threads: int, repeats: int) -> dict:
    torch.set_num_threads(threads)
    started = time.perf_counter()
    fp32_path = export_onnx(model, 224, work / "model.onnx")
    export_s = time.perf_counter() - started
    calibration = [torch.randn(8, 3, 224, 224).numpy() for _ in range(8)]
    started = time.perf_counter()
    int8_path = quantize_int8(fp32_path, calibration, work / "model.int8.onnx")
    quantize_s = time.perf_counter() - started
    scripted = export_torchscript(model, 224)
    fp32, int8 = session(fp32_path, threads), session(int8_path, threads)
    rows = {"export_s": export_s, "quantize_s": quantize_s}
    for batch in (1, 8):
        images = torch.randn(batch, 3, 224, 224)
        feed = {"images": images.numpy()}
        with torch.inference_mode():
            rows[f"torchscript_b{batch}_ms"] = ms_per_call(partial(scripted, images), repeats)
        rows[f"ort_fp32_b{batch}_ms"] = ms_per_call(partial(fp32.run, None, feed), repeats)
        rows[f"ort_int8_b{batch}_ms"] = ms_per_call(partial(int8.run, None, feed), repeats)
        for name in ("torchscript", "ort_fp32", "ort_int8"):
            rows[f"{name}_b{batch}_ms"] /= batch  # per image
    return rows


def onnx_input(jpeg: bytes, pre: Preprocessing, draft: bool) -> np.ndarray:
    image = onnx_handler.decode(jpeg, pre.resize_size if draft else 1 << 30)  # huge: never draft
    pixels = onnx_handler.resize_and_crop(image, pre.resize_size, pre.crop_size)
    mean = np.asarray(pre.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(pre.std, dtype=np.float32).reshape(3, 1, 1)
    return (pixels.transpose(2, 0, 1).astype(np.float32) / 255 - mean) / std


def torch_input(jpeg: bytes, transform: Callable) -> torch.Tensor:
    return transform(torchscript_handler.decode(jpeg))


def preprocessing_ms(pre: Preprocessing, repeats: int) -> dict:
    transform = torchscript_handler.transform_for(asdict(pre))
    torch_ms, numpy_ms = [], []
    for image in photos().values():
        jpeg = encoded(image)
        torch_ms.append(ms_per_call(partial(torch_input, jpeg, transform), repeats))
        numpy_ms.append(ms_per_call(partial(onnx_input, jpeg, pre, draft=True), repeats))
    return {"torch_ms": statistics.median(torch_ms), "pillow_numpy_ms": statistics.median(numpy_ms)}


def encoded(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def draft_effect(model_path: Path, pre: Preprocessing, threads: int, repeats: int) -> dict:
    sess = session(model_path, threads)
    agree, diffs, full_ms, draft_ms = 0, [], 0.0, 0.0
    rows = []
    for name, image in photos().items():
        for scale in SCALES:
            big = image.resize(
                (image.width * scale, image.height * scale), Image.Resampling.LANCZOS
            )
            if min(big.size) < 2 * pre.resize_size:
                continue
            jpeg = encoded(big)
            full = probabilities(sess, onnx_input(jpeg, pre, draft=False)[None])[0]
            drafted = probabilities(sess, onnx_input(jpeg, pre, draft=True)[None])[0]
            same = int(full.argmax() == drafted.argmax())
            agree += same
            diffs.append(float(np.abs(full - drafted).max()))
            full_ms += ms_per_call(partial(onnx_input, jpeg, pre, draft=False), repeats)
            draft_ms += ms_per_call(partial(onnx_input, jpeg, pre, draft=True), repeats)
            rows.append({"photo": name, "size": big.size, "same_top1": bool(same),
                         "full_top1_p": float(full.max()), "max_diff": diffs[-1]})  # fmt: skip
    return {"images": len(diffs), "top1_agreement": agree / len(diffs),
            "max_probability_diff": max(diffs), "median_probability_diff": statistics.median(diffs),
            "decode_preprocess_ms_full": full_ms / len(diffs),
            "decode_preprocess_ms_draft": draft_ms / len(diffs), "rows": rows}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    pre = Preprocessing()
    model = efficientnet_lite0_imagenet().eval()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results = {"forward": forward_ms(model, work, args.threads, args.repeats)}
        print(json.dumps(results["forward"]), flush=True)
        results["preprocessing"] = preprocessing_ms(pre, args.repeats)
        print(json.dumps(results["preprocessing"]), flush=True)
        results["draft"] = draft_effect(work / "model.onnx", pre, args.threads, 5)
    print(json.dumps(results["draft"], indent=1))


if __name__ == "__main__":
    main()
