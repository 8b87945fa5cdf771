"""How fast refit serves, side by side on one stack (issue 25's targets), in one run.

One stack (bench/running_stack.py: the embedded store, a real TorchServe with token auth, the
service as its own process) serves the base model's weights (EfficientNet-Lite0, ImageNet, 224 px)
three ways, as versions of ``imagenet``:
- v1 as ``make up`` publishes it: ONNX fp32, run by ONNX Runtime in the worker;
- v2: a TorchScript archive of the same weights, as archives made before ONNX are;
- v3: ONNX int8 of the same weights, calibrated on the photos below (for speed only: int8's
  accuracy is measured on Fashion-MNIST, bench/finetune_fashion_mnist.py --compare-runtimes).
The images: scikit-image's photos as JPEG at their own sizes (300x451 to 512x512) and two
upscaled ones (1200x1800, 2048x2048). Every path gets the same images in the same order.

Printed:
1. Predict through the service at concurrency 8 and 1 for each version, in interleaved rounds
   (drift in the machine's load hits each alike): req/s, p50, p99, and ratios against v2.
2. The same at concurrency 1 straight to TorchServe's gRPC API (v1), to say where the service's
   milliseconds go, beside the worker's batch delay.
3. Each ONNX archive's handler alone in this process (decode, transform, forward, top-5; the
   threads the worker uses): images/s at batch 8 and 1, and served / in-process.
4. v1's worker resident memory after 100 and after ``--rss-predicts`` Predicts.

    PYTHONPATH=. .venv/bin/python bench/serving.py [--requests 400] [--rounds 4]
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
from PIL import Image
from predict_latency import interleaved, load
from running_stack import RunningStack, running_stack
from skimage import data

from refit.registry import Batching, Registry, VersionRecord
from refit.storage import StorageSettings
from refit.torchserve import Keys
from refit.torchserve_api import inference_pb2, inference_pb2_grpc
from refit.v1 import refit_pb2, refit_pb2_grpc
from trainer.backbones import efficientnet_lite0_imagenet
from trainer.base_model import imagenet_classes
from trainer.package import ONNX, TORCHSCRIPT, ExportedModel, build_archive, export_model, package
from trainer.preprocessing import Preprocessing
from trainer.quantize import quantize_int8
from trainer.serving.onnx_handler import RefitOnnxClassifier, decode, resize_and_crop

Call = Callable[[bytes], None]
VERSIONS = {"1": "ONNX fp32", "2": "TorchScript (before)", "3": "ONNX int8"}
BASELINE = "2"


def photos() -> list[bytes]:
    def jpeg(array: np.ndarray, scale: float = 1.0) -> bytes:
        image = Image.fromarray(array)
        if scale != 1.0:
            size = (round(image.width * scale), round(image.height * scale))
            image = image.resize(size, Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, "JPEG", quality=90)
        return buffer.getvalue()

    own = [data.coffee(), data.chelsea(), data.astronaut(), data.rocket()]
    return [*(jpeg(a) for a in own), jpeg(data.coffee(), 3.0), jpeg(data.astronaut(), 4.0)]


def publish_versions(stack: RunningStack, images: list[bytes]) -> dict[str, Path]:
    """v2 (TorchScript) and v3 (int8) of v1's weights; returns each ONNX archive's path."""
    store = StorageSettings(data_dir=stack.data_dir).open()
    registry = Registry(store, "refit")
    model, preprocessing = efficientnet_lite0_imagenet(), Preprocessing()
    classes = imagenet_classes()
    out = stack.data_dir / "bench-archives"
    common = dict(model_name="imagenet", class_names=classes, preprocessing=preprocessing,
                  metadata={"backbone": "efficientnet_lite0"}, out_dir=out)  # fmt: skip
    torchscript = build_archive(model, version="2", runtime=TORCHSCRIPT, **common)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_model(model, preprocessing.crop_size, Path(tmp), ONNX)
        batch = np.stack([normalized(image, preprocessing) for image in images])
        (Path(tmp) / "int8").mkdir()
        int8_file = quantize_int8(fp32.path, [batch], Path(tmp) / "int8" / "model.onnx")
        int8 = package(ExportedModel(int8_file, ONNX, "int8"), version="3", **common)
    for version, archive, precision in (("2", torchscript, "fp32"), ("3", int8, "int8")):
        key = Registry.archive_key("imagenet", archive.digest)
        store.put_file("refit", key, archive.path)
        registry.add(VersionRecord("imagenet", version, key, classes, batching=Batching(),
                                   precision=precision))  # fmt: skip
    v1 = registry.get("imagenet", "1").archive_key
    return {"1": stack.data_dir / "objects" / "refit" / v1, "3": int8.path}


def normalized(image: bytes, preprocessing: Preprocessing) -> np.ndarray:
    pixels = resize_and_crop(decode(image, preprocessing.resize_size), preprocessing.resize_size,
                             preprocessing.crop_size).astype(np.float32) / 255  # fmt: skip
    mean, std = np.asarray(preprocessing.mean), np.asarray(preprocessing.std)
    return ((pixels - mean) / std).transpose(2, 0, 1).astype(np.float32)


def via_refit(stack: RunningStack, version: str) -> Callable[[], Call]:
    metadata = [("authorization", f"Bearer {stack.predict_token}")]

    def make() -> Call:
        stub = refit_pb2_grpc.RefitStub(grpc.insecure_channel(stack.address))
        request = refit_pb2.PredictRequest(model="imagenet", version=version, top_k=5)

        def call(image: bytes) -> None:
            request.image = image
            stub.Predict(request, metadata=metadata, timeout=120)

        return call

    return make


def via_torchserve(stack: RunningStack, version: str) -> Callable[[], Call]:
    metadata = [("authorization", f"Bearer {stack.torchserve_inference_key}")]

    def make() -> Call:
        channel = grpc.insecure_channel(stack.torchserve_inference)
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        return lambda image: stub.Predictions(
            inference_pb2.PredictionsRequest(
                model_name="imagenet", model_version=version, input={"data": image, "top_k": b"5"}
            ),
            metadata=metadata,
            timeout=120,
        )

    return make


def wait_servable(
    stack: RunningStack, images: list[bytes], versions=tuple(VERSIONS), timeout_s: float = 300
) -> None:
    deadline = time.monotonic() + timeout_s
    for version in versions:
        call = via_refit(stack, version)()
        while True:
            try:
                call(images[0])
                break
            except grpc.RpcError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"v{version} never answered: {exc.details()}") from exc
                time.sleep(1)


def in_process(archive: Path, images: list[bytes], batch: int, seconds: float = 10.0) -> float:
    """Images/s of the archive's handler alone (decode, transform, forward, top-5), batches of
    ``batch`` images taken round robin from ``images``."""
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(archive) as mar:
            mar.extractall(tmp)
        manifest = json.loads((Path(tmp) / "MAR-INF" / "MANIFEST.json").read_text())
        handler = RefitOnnxClassifier()
        handler.initialize(SimpleNamespace(system_properties={"model_dir": tmp},
                                           manifest=manifest, model_yaml_config={}))  # fmt: skip
        rows = [{"data": image, "top_k": 5} for image in images]
        done, start, i = 0, time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            chunk = [rows[(i + j) % len(rows)] for j in range(batch)]
            i += batch
            handler.postprocess(handler.inference(handler.preprocess(chunk)))
            done += batch
        return done / (time.perf_counter() - start)


def worker_rss_mb(stack: RunningStack, version: str) -> float:
    """The resident memory of the version's worker (TorchServe's management API names its pid)."""
    home = stack.data_dir / "ts"
    config = (home / "config.properties").read_text()
    port = int(next(line for line in config.splitlines()
                    if line.startswith("management_address")).rsplit(":", 1)[1])  # fmt: skip
    key = Keys.parse((home / "key_file.json").read_text()).management
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", f"/models/imagenet/{version}",
                       headers={"Authorization": f"Bearer {key}"})  # fmt: skip
    workers = json.loads(connection.getresponse().read())[0]["workers"]
    pid = workers[0]["pid"]
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400, help="per path and concurrency")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds per level")
    parser.add_argument("--rss-predicts", type=int, default=10_000)
    args = parser.parse_args()
    images = photos()
    with running_stack() as stack:
        archives = publish_versions(stack, images)
        wait_servable(stack, images)
        paths = {f"v{v} {name}": via_refit(stack, v) for v, name in VERSIONS.items()}
        for make in paths.values():
            load(make, images, 32, 4)  # warm: every worker, every image size
        served = {c: interleaved(paths, images, args.requests, c, args.rounds) for c in (8, 1)}
        direct = interleaved({"TorchServe direct v1": via_torchserve(stack, "1"),
                              "refit v1": paths["v1 ONNX fp32"]},
                             images, args.requests, 1, args.rounds)  # fmt: skip
        alone = {v: {b: in_process(archives[v], images, b) for b in (8, 1)} for v in archives}
        load(paths["v1 ONNX fp32"], images, 100, 8)
        rss_100 = worker_rss_mb(stack, "1")
        load(paths["v1 ONNX fp32"], images, args.rss_predicts - 100, 8)
        rss_after = worker_rss_mb(stack, "1")
    report(served, direct, alone, (rss_100, rss_after, args.rss_predicts))


def report(served: dict, direct: dict, alone: dict, rss: tuple) -> None:
    print("| path | concurrency | req/s | p50 ms | p99 ms | req/s vs v2 |")
    print("|---|---|---|---|---|---|")
    for c, results in served.items():
        base = results[f"v{BASELINE} {VERSIONS[BASELINE]}"]["rps"]
        for name, r in results.items():
            print(f"| {name} | {c} | {r['rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                  f"{r['rps'] / base:.2f}x |")  # fmt: skip
    print("\n| concurrency 1, v1 | req/s | p50 ms | p99 ms |\n|---|---|---|---|")
    for name, r in direct.items():
        print(f"| {name} | {r['rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |")
    print(f"(the worker waits up to {Batching().max_batch_delay_ms} ms for a batch to fill)")
    print("\n| archive alone (this process) | batch 8 img/s | batch 1 img/s | served c=8 / alone "
          "batch 8 |\n|---|---|---|---|")  # fmt: skip
    for v, figures in alone.items():
        rps = served[8][f"v{v} {VERSIONS[v]}"]["rps"]
        print(f"| v{v} {VERSIONS[v]} | {figures[8]:.1f} | {figures[1]:.1f} | "
              f"{rps / figures[8]:.2f} |")  # fmt: skip
    rss_100, rss_after, count = rss
    print(f"\nv1 worker RSS: {rss_100:.0f} MB after 100 Predicts, {rss_after:.0f} MB after "
          f"{count}: {rss_after / rss_100:.3f}x")  # fmt: skip


if __name__ == "__main__":
    main()
