"""Where the service's own CPU per Predict goes, layer by layer, in one process.

A stand-in for TorchServe's inference API (bench/frontdoor_aio_probe.py's, its own process,
answering after ``--upstream-ms``) takes every upstream call, so this process's CPU time per
call (user + system, all its threads) is the cost of the layers it runs, whatever they wait on.
Each layer adds one piece of the real Predict path to the one before it:

- a raw stub on a plain channel; the stub on TorchServeClient's channel (round robin, retry
  policy); ``TorchServeClient.predict``; ``Predictor.predict`` (checks, catalog, workers);
- over gRPC (the client's CPU is in this process too): the probe's bare sync proxy, the same
  behind the service's interceptors, the service's servicer (with the Predictor above) behind
  them on the same plain server, and the service itself (``build_server``: its server options,
  health and reflection; no background threads).

The layers take turns in interleaved rounds. Then each piece of pure-Python work alone (timeit,
no network).

Usage: PYTHONPATH=. .venv/bin/python bench/frontdoor_breakdown.py [--calls 1000] [--rounds 3]
           [--upstream-ms 25]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import tempfile
import time
import timeit
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from frontdoor_aio_probe import ANSWER, TOKEN, SyncProxy, serve_upstream
from predict_latency import jpeg
from skimage import data

from refit.identifiers import check_model_name, check_version
from refit.netutil import free_port
from refit.registry import Registry
from refit.storage import StorageSettings
from refit.torchserve import TorchServeClient
from refit.torchserve_api import inference_pb2, inference_pb2_grpc
from refit.v1 import refit_pb2, refit_pb2_grpc
from service.auth import AuthSettings
from service.catalog import ModelCatalog
from service.config import ServiceSettings
from service.images import inspect_image
from service.metrics import PREDICTIONS, observe_payload, observe_upstream
from service.predictions import Prediction, Predictor, PredictResult
from service.server import _interceptors, build_server
from service.servicer import RefitServicer, _predict_response
from trainer.base_model import publish_base_model

Call = Callable[[], object]


def cpu_ms_per_call(call: Call, calls: int) -> tuple[float, float]:
    """(process CPU ms per call, wall p50 ms) over ``calls`` calls, after a short warm-up."""
    for _ in range(20):
        call()
    latencies = []
    cpu = time.process_time()
    for _ in range(calls):
        start = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - start)
    return 1000 * (time.process_time() - cpu) / calls, 1000 * statistics.median(latencies)


def ready(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=60)


def serve_in_process(servicer: refit_pb2_grpc.RefitServicer, interceptors: list) -> grpc.Server:
    server = grpc.server(ThreadPoolExecutor(max_workers=32), interceptors=interceptors)
    refit_pb2_grpc.add_RefitServicer_to_server(servicer, server)
    server.port = server.add_insecure_port("127.0.0.1:0")  # type: ignore[attr-defined]
    server.start()
    return server


def refit_call(port: int, image: bytes) -> Call:
    stub = refit_pb2_grpc.RefitStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    request = refit_pb2.PredictRequest(image=image, model="imagenet", version="1", top_k=5)
    metadata = [("authorization", f"Bearer {TOKEN}")]
    return lambda: stub.Predict(request, metadata=metadata, timeout=10)


def layers(upstream: str, storage: StorageSettings, image: bytes) -> tuple[dict, list]:
    settings = ServiceSettings(
        grpc_address="127.0.0.1:0",
        torchserve_inference=upstream,
        torchserve_management=f"127.0.0.1:{free_port()}",  # never called here
        storage=storage,
        auth=AuthSettings(admin_tokens=(TOKEN,)),
    )
    service = build_server(settings)
    service.server.start()  # no background threads: the reconciler would find no management API
    client = service.torchserve
    catalog = ModelCatalog(Registry(storage.open(), settings.bucket))
    catalog.refresh()
    predictor = Predictor(settings, catalog, client)
    raw = inference_pb2_grpc.InferenceAPIsServiceStub(grpc.insecure_channel(upstream))
    request = inference_pb2.PredictionsRequest(
        model_name="imagenet", model_version="1", input={"data": image, "top_k": b"5"}
    )
    bare = serve_in_process(SyncProxy(upstream), [])
    intercepted = serve_in_process(SyncProxy(upstream), _interceptors(settings))
    servicer = RefitServicer(predictor, catalog, 1, None, None)  # type: ignore[arg-type]
    plain_refit = serve_in_process(servicer, _interceptors(settings))
    steps = {
        "stub, plain channel": lambda: raw.Predictions(request, timeout=10),
        "stub, TorchServeClient's channel": lambda: client._inference.Predictions(
            request, timeout=10
        ),
        "TorchServeClient.predict": lambda: client.predict("imagenet", "1", image, 5),
        "Predictor.predict": lambda: predictor.predict(image, "imagenet", "1", 5, 10.0),
        "gRPC: bare sync proxy": refit_call(bare.port, image),
        "gRPC: bare proxy + interceptors": refit_call(intercepted.port, image),
        "gRPC: RefitServicer, plain server": refit_call(plain_refit.port, image),
        "gRPC: refit service (build_server)": refit_call(service.port, image),
    }
    return steps, [bare, intercepted, plain_refit, service.server]


def pieces(storage: StorageSettings, image: bytes) -> dict[str, Call]:
    """The pure-Python work of one Predict, each piece alone."""
    settings = ServiceSettings(storage=storage)
    catalog = ModelCatalog(Registry(storage.open(), settings.bucket))
    catalog.refresh()
    nowhere = f"127.0.0.1:{free_port()}"  # channels connect lazily: never called here
    predictor = Predictor(settings, catalog, TorchServeClient(nowhere, nowhere))
    answer = json.loads(ANSWER)
    result = PredictResult(
        "imagenet",
        "1",
        [Prediction(p["label"], p["score"], p["index"]) for p in answer["predictions"]],
    )

    def serving() -> None:
        with predictor.workers.serving("imagenet", "1", 10.0):
            pass

    return {
        "check_model_name + check_version": lambda: (
            check_model_name("imagenet"),
            check_version("1"),
        ),
        "inspect_image (70 KiB JPEG header)": lambda: inspect_image(
            image, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels
        ),
        "catalog.resolve": lambda: catalog.resolve("imagenet", "1"),
        "workers.serving (enter + exit)": serving,
        "PREDICTIONS.labels(...).inc()": lambda: PREDICTIONS.labels("imagenet", "1").inc(),
        "observe_payload": lambda: observe_payload("Predict", len(image)),
        "observe_upstream": lambda: observe_upstream("predict", 0.02, None),
        "PredictionsRequest(...) with the image": lambda: inference_pb2.PredictionsRequest(
            model_name="imagenet", model_version="1", input={"data": image, "top_k": b"5"}
        ),
        "json.loads(TorchServe's answer)": lambda: json.loads(ANSWER),
        "Prediction dataclasses from the answer": lambda: [
            Prediction(p["label"], p["score"], p["index"]) for p in answer["predictions"]
        ],
        "_predict_response (5 predictions)": lambda: _predict_response("", result),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000, help="per layer, over all rounds")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--upstream-ms", type=float, default=0.0, help="the stand-in's delay")
    args = parser.parse_args()
    image = jpeg(data.coffee())
    upstream_port = free_port()
    upstream = multiprocessing.get_context("spawn").Process(
        target=serve_upstream, args=(upstream_port, args.upstream_ms / 1000), daemon=True
    )
    upstream.start()
    with tempfile.TemporaryDirectory() as tmp:
        storage = StorageSettings(data_dir=Path(tmp))
        publish_base_model(storage.open(), "refit")
        ready(f"127.0.0.1:{upstream_port}")
        steps, servers = layers(f"127.0.0.1:{upstream_port}", storage, image)
        figures: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
        try:
            for _ in range(args.rounds):
                for name, call in steps.items():
                    figures[name].append(cpu_ms_per_call(call, args.calls // args.rounds))
        finally:
            for server in servers:
                server.stop(0)
            upstream.terminate()
        print(
            f"layers, {args.calls} calls each at concurrency 1, median of {args.rounds} rounds, "
            f"stand-in answers after {args.upstream_ms} ms; load average {os.getloadavg()}"
        )
        previous = None
        for name, runs in figures.items():
            cpu = statistics.median(c for c, _ in runs)
            p50 = statistics.median(p for _, p in runs)
            added = "" if previous is None else f"  ({cpu - previous:+.3f} ms)"
            print(f"  {name:36} CPU {cpu:6.3f} ms per call{added:14}  p50 {p50:6.3f} ms")
            previous = cpu
        print("pieces, each alone (best of 5 x 2,000 calls)")
        for name, call in pieces(storage, image).items():
            seconds = min(timeit.repeat(call, number=2000, repeat=5)) / 2000
            print(f"  {name:40} {1e6 * seconds:7.1f} us")


if __name__ == "__main__":
    main()
