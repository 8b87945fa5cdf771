"""Predict latency and throughput: refit service vs direct TorchServe gRPC vs direct REST.

Same model (imagenet v1, EfficientNet-Lite0), same images, one run, concurrency 1 and 8.
Starts its own stack on free ports (embedded store, TorchServe, the service as a separate
process) and tears it down. Usage: .venv/bin/python bench/predict_latency.py [--requests N]
"""

from __future__ import annotations

import argparse
import http.client
import io
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from PIL import Image
from skimage import data

from refit.client import ClientSettings, connect
from refit.netutil import free_port, wait_serving
from refit.storage import StorageSettings
from refit.torchserve_api import inference_pb2, inference_pb2_grpc
from refit.torchserve_process import TorchServePorts, TorchServeProcess, allowed_urls_for
from refit.v1 import refit_pb2, refit_pb2_grpc
from trainer.base_model import publish_base_model

Call = Callable[[bytes], None]
TOKEN = secrets.token_urlsafe(32)  # the service is measured with auth on


def jpeg(array: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def via_refit(address: str) -> Callable[[], Call]:
    def make() -> Call:
        stub = refit_pb2_grpc.RefitStub(connect(ClientSettings(address, token=TOKEN)))
        return lambda image: stub.Predict(
            refit_pb2.PredictRequest(image=image, model="imagenet", version="1", top_k=5),
            timeout=60,
        )

    return make


def via_torchserve_grpc(port: int) -> Callable[[], Call]:
    def make() -> Call:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(
            grpc.insecure_channel(f"127.0.0.1:{port}")
        )
        return lambda image: stub.Predictions(
            inference_pb2.PredictionsRequest(
                model_name="imagenet", model_version="1", input={"data": image, "top_k": b"5"}
            ),
            timeout=60,
        )

    return make


def via_torchserve_rest(port: int) -> Callable[[], Call]:
    def make() -> Call:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        headers = {"Content-Type": "application/octet-stream"}

        def call(image: bytes) -> None:
            connection.request("POST", "/predictions/imagenet/1", body=image, headers=headers)
            response = connection.getresponse()
            if response.status != 200:
                raise RuntimeError(f"REST {response.status}: {response.read()[:200]!r}")
            response.read()

        return call

    return make


def load(make: Callable[[], Call], images: list[bytes], requests: int, concurrency: int) -> tuple:
    """Runs ``requests`` calls from ``concurrency`` threads; returns (latencies, seconds)."""
    latencies: list[float] = []
    lock = threading.Lock()
    per_thread = requests // concurrency
    barrier = threading.Barrier(concurrency + 1)

    def worker(offset: int) -> None:
        call = make()
        call(images[0])  # connection set-up outside the measurement
        barrier.wait()
        mine = []
        for i in range(per_thread):
            start = time.perf_counter()
            call(images[(offset + i) % len(images)])
            mine.append(time.perf_counter() - start)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(concurrency)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    return latencies, time.perf_counter() - start


def interleaved(paths: dict, images: list[bytes], requests: int, concurrency: int) -> dict:
    """Alternates the paths in rounds so drift in machine load hits each of them alike."""
    rounds = 5
    samples = {name: ([], 0.0) for name in paths}
    for _ in range(rounds):
        for name, make in paths.items():
            latencies, seconds = load(make, images, requests // rounds, concurrency)
            done, total = samples[name]
            samples[name] = (done + latencies, total + seconds)
    return {name: summarize(*sample) for name, sample in samples.items()}


def summarize(latencies: list[float], seconds: float) -> dict:
    latencies = sorted(latencies)
    return {
        "rps": len(latencies) / seconds,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=400, help="per path and concurrency")
    args = parser.parse_args()
    images = [jpeg(data.coffee()), jpeg(data.chelsea()), jpeg(data.astronaut())]
    with tempfile.TemporaryDirectory() as tmp:
        storage = StorageSettings(data_dir=Path(tmp))
        store = storage.open()
        publish_base_model(store, "refit")
        ports = TorchServePorts(*(free_port() for _ in range(5)))
        torchserve = TorchServeProcess(
            Path(tmp) / "ts", ports, allowed_urls_for((Path(tmp) / "objects").as_uri())
        )
        torchserve.start()
        address = f"127.0.0.1:{free_port()}"
        env = {
            **os.environ,
            "REFIT_DATA_DIR": tmp,
            "REFIT_GRPC_ADDRESS": address,
            "REFIT_METRICS_ADDRESS": f"127.0.0.1:{free_port()}",
            "REFIT_TORCHSERVE_INFERENCE": f"127.0.0.1:{ports.grpc_inference}",
            "REFIT_TORCHSERVE_MANAGEMENT": f"127.0.0.1:{ports.grpc_management}",
            "REFIT_ADMIN_TOKEN": TOKEN,
        }
        service = subprocess.Popen([sys.executable, "-m", "service.server"], env=env)
        try:
            wait_serving(address, alive=lambda: service.poll() is None)
            paths = {
                "refit service (gRPC)": via_refit(address),
                "TorchServe gRPC (direct)": via_torchserve_grpc(ports.grpc_inference),
                "TorchServe REST (direct)": via_torchserve_rest(ports.inference),
            }
            for make in paths.values():  # warm every path and the worker
                load(make, images, 16, 1)
            results = {
                (name, c): result
                for c in (1, 8)
                for name, result in interleaved(paths, images, args.requests, c).items()
            }
        finally:
            service.terminate()
            service.wait(15)
            torchserve.stop()
    report(results)


def report(results: dict) -> None:
    print("| path | concurrency | req/s | p50 ms | p99 ms | req/s vs TS gRPC | p50 vs TS gRPC |")
    print("|---|---|---|---|---|---|---|")
    for (name, c), r in results.items():
        base = results[("TorchServe gRPC (direct)", c)]
        print(
            f"| {name} | {c} | {r['rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r['rps'] / base['rps']:.2f}x | {r['p50_ms'] - base['p50_ms']:+.1f} ms |"
        )


if __name__ == "__main__":
    main()
