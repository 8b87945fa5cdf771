"""Where Predict time goes, measured in one process: raw TorchServe stub, the service's
TorchServe client, Predictor.predict, and the full gRPC service. p50 ms of N calls per step.
Then the service's own per-call costs, without TorchServe: a bare Python gRPC round trip (a
health Check on a server with nothing else), the image header checks and the token check.

Usage: .venv/bin/python bench/predict_breakdown.py [--calls 150] [--rounds 2]
"""

from __future__ import annotations

import argparse
import io
import secrets
import statistics
import tempfile
import time
import timeit
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from PIL import Image
from skimage import data

from cli.client import ClientSettings, connect
from local_stack.torchserve import TorchServePorts, TorchServeProcess, allowed_urls_for
from refit.netutil import free_port, wait_serving
from refit.registry import Registry
from refit.storage import StorageSettings
from refit.torchserve import Keys
from refit.torchserve_api import inference_pb2, inference_pb2_grpc
from refit.v1 import refit_pb2, refit_pb2_grpc
from service.auth import Authenticator, AuthSettings
from service.catalog import ModelCatalog
from service.config import ServiceSettings
from service.images import inspect_image
from service.predictions import Predictor
from service.server import build_server
from trainer.base_model import publish_base_model

TOKEN = secrets.token_urlsafe(32)  # the full gRPC path is measured with auth on


def p50_ms(call: Callable[[], object], calls: int) -> float:
    for _ in range(10):
        call()
    latencies = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - start)
    return 1000 * statistics.median(latencies)


def per_call_costs(image: bytes, calls: int) -> dict[str, str]:
    """The service's own work per Predict, each alone: no TorchServe, no other process."""
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            round_trip = p50_ms(lambda: check(health_pb2.HealthCheckRequest(), timeout=5), calls)
    finally:
        server.stop(0)
    limits = ServiceSettings()
    header_s = min(timeit.repeat(
        lambda: inspect_image(image, max_bytes=limits.max_image_bytes,
                              max_pixels=limits.max_image_pixels),
        number=1000, repeat=5,
    )) / 1000  # fmt: skip
    tokens = [secrets.token_urlsafe(32) for _ in range(3)]
    authenticator = Authenticator(AuthSettings(tuple(tokens[:2]), tuple(tokens[2:])))
    role_s = min(timeit.repeat(lambda: authenticator.role_of(tokens[2]), number=200_000,
                               repeat=3)) / 200_000  # fmt: skip
    return {
        "bare Python gRPC round trip (health Check)": f"p50 {round_trip:.2f} ms",
        "image header checks (inspect_image, coffee JPEG)": f"{header_s * 1e6:.1f} us per image",
        "token role check (Authenticator.role_of, 3 tokens)": f"{role_s * 1e6:.1f} us per call",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    buffer = io.BytesIO()
    Image.fromarray(data.coffee()).save(buffer, "JPEG")
    image = buffer.getvalue()
    with tempfile.TemporaryDirectory() as tmp:
        storage = StorageSettings(data_dir=Path(tmp))
        publish_base_model(storage.open(), "refit")
        ports = TorchServePorts(*(free_port() for _ in range(5)))
        objects = (Path(tmp) / "objects").as_uri()
        torchserve = TorchServeProcess(Path(tmp) / "ts", ports, allowed_urls_for(objects))
        torchserve.start()
        settings = ServiceSettings(
            grpc_address="127.0.0.1:0",
            health_address="127.0.0.1:0",
            torchserve_inference=f"127.0.0.1:{ports.grpc_inference}",
            torchserve_management=f"127.0.0.1:{ports.grpc_management}",
            torchserve_keys=torchserve.keys,
            storage=storage,
            auth=AuthSettings(admin_tokens=(TOKEN,)),
        )
        service = build_server(settings)
        service.start(settings.reconcile_interval_s)
        try:
            wait_serving(f"127.0.0.1:{service.port}")
            raw = inference_pb2_grpc.InferenceAPIsServiceStub(
                grpc.insecure_channel(f"127.0.0.1:{ports.grpc_inference}")
            )
            keys = Keys.parse(torchserve.key_file.read_text())
            raw_request = inference_pb2.PredictionsRequest(
                model_name="imagenet", model_version="1", input={"data": image, "top_k": b"5"}
            )
            catalog = ModelCatalog(Registry(storage.open(), "refit"))
            catalog.refresh()
            predictor = Predictor(settings, catalog, service.torchserve)
            channel = connect(ClientSettings(f"127.0.0.1:{service.port}", token=TOKEN))
            stub = refit_pb2_grpc.RefitStub(channel)
            request = refit_pb2.PredictRequest(image=image, model="imagenet", version="1")
            steps = {
                "raw TorchServe stub": lambda: raw.Predictions(
                    raw_request, timeout=30, metadata=keys.metadata("inference")
                ),
                "service's TorchServe client": lambda: service.torchserve.predict(
                    "imagenet", "1", image, 5
                ),
                "Predictor.predict": lambda: predictor.predict(image, "imagenet", "1", 5),
                "full gRPC service (same process)": lambda: stub.Predict(request, timeout=30),
            }
            for round_ in range(1, args.rounds + 1):
                for name, call in steps.items():
                    print(f"round {round_}  {name:34} p50 {p50_ms(call, args.calls):6.1f} ms")
        finally:
            service.stop()
            torchserve.stop()
    for name, figure in per_call_costs(image, args.calls).items():
        print(f"{name:52} {figure}")


if __name__ == "__main__":
    main()
