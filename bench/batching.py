"""Dynamic batching: the same model served batched and unbatched, side by side in one run.

One stack (bench/running_stack.py: embedded store, TorchServe, the service as its own process,
tokens on). imagenet v1's archive (EfficientNet-Lite0, 224 px) is recorded again as model
``unbatched`` (batch_size 1) and as ``batched-S-D`` for each ``--configs S:D`` (batch_size S,
max_batch_delay D ms); the service's reconciler registers each with its own TorchServe worker.
Every concurrency level then runs all of them in interleaved rounds, through the public Predict
API, on the same three photos, so drift in machine load hits each alike.

To say where the gain comes from, it also times, in this process, the served ONNX model's
forward pass per image at batch 1 and at each batch size, and the handler's decode + preprocessing
per image (work batching cannot share).

Usage: .venv/bin/python bench/batching.py [--configs 8:5,16:5] [--requests 384] [--rounds 4]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import grpc
from predict_latency import Call, interleaved, jpeg, load
from running_stack import RunningStack, running_stack
from skimage import data

from cli.client import ClientSettings, connect
from refit.registry import Batching, Registry, VersionRecord
from refit.storage import StorageSettings
from refit.v1 import refit_pb2 as pb
from refit.v1 import refit_pb2_grpc


def parse_configs(text: str) -> list[Batching]:
    sizes_delays = (item.split(":") for item in text.split(",") if item)
    return [Batching(int(size), int(delay)) for size, delay in sizes_delays]


def model_name(batching: Batching) -> str:
    if batching.batch_size == 1:
        return "unbatched"
    return f"batched-{batching.batch_size}-{batching.max_batch_delay_ms}"


def record_models(stack: RunningStack, configs: list[Batching]) -> list[str]:
    """imagenet v1's archive under one model per batching, each the default of its model."""
    registry = Registry(StorageSettings(data_dir=stack.data_dir).open(), "refit")
    source = registry.get("imagenet", "1")
    names = []
    for batching in [Batching(1, 1), *configs]:
        name = model_name(batching)
        registry.add(
            VersionRecord(name, "1", source.archive_key, source.class_names, batching=batching)
        )
        registry.set_default(name, "1")
        names.append(name)
    return names


def wait_registered(stub: refit_pb2_grpc.RefitStub, names: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for name in names:
        while True:
            try:
                model = stub.GetModel(pb.GetModelRequest(name=name), timeout=10)
                if model.default_served:
                    break
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} was not served after {timeout_s:.0f}s")
            time.sleep(1)


def caller(stack: RunningStack, model: str) -> Callable[[], Call]:
    def make() -> Call:
        channel = connect(ClientSettings(stack.address, token=stack.predict_token))
        stub = refit_pb2_grpc.RefitStub(channel)
        return lambda image: stub.Predict(
            pb.PredictRequest(image=image, model=model, top_k=5), timeout=120
        )

    return make


def forward_costs(stack: RunningStack, sizes: list[int], images: list[bytes]) -> dict:
    """Per-image milliseconds of the served archive's forward pass (its ONNX Runtime session, the
    threads a lone worker gets) at each batch size, and of its handler's decode + preprocessing."""
    import json
    import tempfile
    from types import SimpleNamespace

    from trainer.serving.onnx_handler import RefitOnnxClassifier

    store = StorageSettings(data_dir=stack.data_dir).open()
    archive = store.get("refit", Registry(store, "refit").get("imagenet", "1").archive_key)
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(io.BytesIO(archive)) as mar:
            mar.extractall(tmp)
        manifest = json.loads((Path(tmp) / "MAR-INF" / "MANIFEST.json").read_text())
        handler = RefitOnnxClassifier()
        handler.initialize(SimpleNamespace(system_properties={"model_dir": tmp},
                                           manifest=manifest, model_yaml_config={}))  # fmt: skip
    rows = [{"data": image} for image in images]
    costs, start, count = {}, time.perf_counter(), 0
    while time.perf_counter() - start < 2.0:
        batch, _ = handler.preprocess([rows[count % len(rows)]])
        count += 1
    costs["preprocess"] = 1000 * (time.perf_counter() - start) / count
    for size in sorted({1, *sizes}):
        inputs = {handler.input_name: batch.repeat(size, axis=0)}
        handler.model.run(None, inputs)  # warm-up
        runs = []
        for _ in range(5):
            begin = time.perf_counter()
            handler.model.run(None, inputs)
            runs.append(1000 * (time.perf_counter() - begin) / size)
        costs[size] = statistics.median(runs)
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--configs", default="8:5", help="batch_size:max_batch_delay_ms,...")
    parser.add_argument("--requests", type=int, default=384, help="per model and concurrency")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--concurrency", default="1,8,32", help="levels, comma-separated")
    args = parser.parse_args()
    configs = parse_configs(args.configs)
    images = [jpeg(data.coffee()), jpeg(data.chelsea()), jpeg(data.astronaut())]
    print(f"load average at start: {os.getloadavg()}", flush=True)
    # Queues at 32 in flight on a loaded 2-core machine outlast the default 30 s upstream timeout.
    env = {"REFIT_RECONCILE_INTERVAL_S": "1", "REFIT_UPSTREAM_TIMEOUT_S": "300"}
    with running_stack(env=env) as stack:
        names = record_models(stack, configs)
        admin = connect(ClientSettings(stack.address, token=stack.admin_token))
        wait_registered(refit_pb2_grpc.RefitStub(admin), names, timeout_s=600)
        paths = {name: caller(stack, name) for name in names}
        for make in paths.values():  # warm every worker
            load(make, images, 16, 1)
        results = {}
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            measured = interleaved(paths, images, args.requests, concurrency, args.rounds)
            results |= {(name, concurrency): r for name, r in measured.items()}
            print(f"concurrency {concurrency} done", flush=True)
        costs = forward_costs(stack, [c.batch_size for c in configs], images)
    print(f"load average at end: {os.getloadavg()}")
    report(results, configs, costs)


def report(results: dict, configs: list[Batching], costs: dict) -> None:
    print("| model | batch_size | max_batch_delay | concurrency | req/s | p50 ms | p99 ms |"
          " req/s vs unbatched | p50 vs unbatched |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    settings = {model_name(b): b for b in [Batching(1, 1), *configs]}
    for (name, concurrency), r in results.items():
        base = results[("unbatched", concurrency)]
        batching = settings[name]
        delay = f"{batching.max_batch_delay_ms} ms" if batching.batch_size > 1 else "-"
        print(
            f"| {name} | {batching.batch_size} | {delay} | {concurrency} | {r['rps']:.1f} | "
            f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['rps'] / base['rps']:.2f}x | "
            f"{r['p50_ms'] - base['p50_ms']:+.1f} ms |"
        )
    print()
    print(f"decode + preprocess: {costs.pop('preprocess'):.1f} ms per image")
    for size, ms in costs.items():
        print(f"forward pass at batch {size}: {ms:.1f} ms per image")


if __name__ == "__main__":
    main()
