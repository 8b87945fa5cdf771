"""Predict latency and throughput, side by side in one run, at each --concurrency (1 and 8).

Same model (imagenet v1, EfficientNet-Lite0), same images. Each --target starts its own stack on
free ports and tears it down:
- ``local`` (default): the `make up` layout (embedded store, TorchServe, the service as a separate
  process); measured through the refit service, and directly against TorchServe gRPC and REST.
- ``containers``: the compose stack on this machine's Docker engine (docker-compose.yml with
  docker-compose.test.yml, deploy/containers/stack.py), through the service's published port.

Calls the service refuses with RESOURCE_EXHAUSTED (more in flight than its
``maximum_concurrent_rpcs``, REFIT_GRPC_WORKERS) are counted in the table, not timed.

Usage: PYTHONPATH=. .venv/bin/python bench/predict_latency.py [--requests N]
           [--concurrency 1 8 32] [--rounds 5] [--target local] [--target containers]
"""

from __future__ import annotations

import argparse
import contextlib
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

from local_stack.torchserve import TorchServePorts, TorchServeProcess, allowed_urls_for
from refit.netutil import free_port, wait_serving
from refit.storage import StorageSettings
from refit.torchserve import Keys
from refit.torchserve_api import inference_pb2, inference_pb2_grpc
from refit.v1 import refit_pb2, refit_pb2_grpc
from trainer.base_model import publish_base_model

Call = Callable[[bytes], None]


def jpeg(array: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def via_refit(address: str, token: str) -> Callable[[], Call]:
    metadata = [("authorization", f"Bearer {token}")]

    def make() -> Call:
        stub = refit_pb2_grpc.RefitStub(grpc.insecure_channel(address))
        return lambda image: stub.Predict(
            refit_pb2.PredictRequest(image=image, model="imagenet", version="1", top_k=5),
            metadata=metadata,
            timeout=60,
        )

    return make


def via_torchserve_grpc(port: int, key: str) -> Callable[[], Call]:
    """TorchServe's own gRPC API, with its inference key (its token authorization is on)."""

    def make() -> Call:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(
            grpc.insecure_channel(f"127.0.0.1:{port}")
        )
        return lambda image: stub.Predictions(
            inference_pb2.PredictionsRequest(
                model_name="imagenet", model_version="1", input={"data": image, "top_k": b"5"}
            ),
            metadata=[("authorization", f"Bearer {key}")],
            timeout=60,
        )

    return make


def via_torchserve_rest(port: int, key: str) -> Callable[[], Call]:
    def make() -> Call:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        headers = {"Content-Type": "application/octet-stream", "Authorization": f"Bearer {key}"}

        def call(image: bytes) -> None:
            connection.request("POST", "/predictions/imagenet/1", body=image, headers=headers)
            response = connection.getresponse()
            if response.status != 200:
                raise RuntimeError(f"REST {response.status}: {response.read()[:200]!r}")
            response.read()

        return call

    return make


def load(
    make: Callable[[], Call],
    images: list[bytes],
    requests: int,
    concurrency: int,
    refused: list[int] | None = None,
) -> tuple:
    """``requests`` calls from ``concurrency`` threads; returns (latencies, seconds).

    Any failed call ends the run, unless ``refused`` is given: then calls the server refused
    with RESOURCE_EXHAUSTED (over its ``maximum_concurrent_rpcs``) are added to it instead
    (one entry each), their thread goes on, and they count in no latency."""
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    per_thread = -(-requests // concurrency)  # at least one each
    barrier = threading.Barrier(concurrency + 1)

    def attempt(call: Call, image: bytes) -> bool:
        """Whether the call was served; False when refused and refusals are counted."""
        try:
            call(image)
        except grpc.RpcError as exc:
            if refused is None or exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            return False
        return True

    def worker(offset: int) -> None:
        mine, refusals = [], []
        try:
            call = make()
            attempt(call, images[offset % len(images)])  # connections set up, not measured
            barrier.wait()
            for i in range(per_thread):
                start = time.perf_counter()
                if attempt(call, images[(offset + i) % len(images)]):
                    mine.append(time.perf_counter() - start)
                else:
                    refusals.append(i)
        except threading.BrokenBarrierError:
            return  # another thread failed before the start
        except Exception as exc:
            errors.append(exc)
            barrier.abort()
        with lock:
            latencies.extend(mine)
            if refused is not None:
                refused.extend(refusals)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(concurrency)]
    for thread in threads:
        thread.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    if errors:  # a failed call ends the run: no figure leaves out the slowest requests
        raise RuntimeError(f"{len(errors)} calls failed, the first: {errors[0]}")
    return latencies, time.perf_counter() - start


def interleaved(
    paths: dict, images: list[bytes], requests: int, concurrency: int, rounds: int = 5
) -> dict:
    """Alternates the paths in rounds so drift in machine load hits each of them alike. Calls
    refused with RESOURCE_EXHAUSTED are counted (``refused``), not timed."""
    samples = {name: ([], 0.0, []) for name in paths}
    for _ in range(rounds):
        for name, make in paths.items():
            done, total, refused = samples[name]
            latencies, seconds = load(make, images, requests // rounds, concurrency, refused)
            samples[name] = (done + latencies, total + seconds, refused)
    return {
        name: summarize(latencies, seconds) | {"refused": len(refused)}
        for name, (latencies, seconds, refused) in samples.items()
    }


def summarize(latencies: list[float], seconds: float) -> dict:
    latencies = sorted(latencies)
    return {
        "rps": len(latencies) / seconds,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
    }


def start_local(stack: contextlib.ExitStack, tmp: Path) -> dict[str, Callable[[], Call]]:
    """The `make up` layout on free ports: embedded store, TorchServe, the service process."""
    storage = StorageSettings(data_dir=tmp)
    publish_base_model(storage.open(), "refit")
    ports = TorchServePorts(*(free_port() for _ in range(5)))
    torchserve = TorchServeProcess(tmp / "ts", ports, allowed_urls_for((tmp / "objects").as_uri()))
    torchserve.start()
    stack.callback(torchserve.stop)
    address, token = f"127.0.0.1:{free_port()}", secrets.token_urlsafe(24)
    env = {
        **os.environ,
        "REFIT_DATA_DIR": str(tmp),
        "REFIT_GRPC_ADDRESS": address,
        "REFIT_HEALTH_ADDRESS": f"127.0.0.1:{free_port()}",
        "REFIT_METRICS_ADDRESS": f"127.0.0.1:{free_port()}",
        "REFIT_TORCHSERVE_INFERENCE": f"127.0.0.1:{ports.grpc_inference}",
        "REFIT_TORCHSERVE_MANAGEMENT": f"127.0.0.1:{ports.grpc_management}",
        "REFIT_TORCHSERVE_KEYS": torchserve.keys,
        "REFIT_ADMIN_TOKEN": token,
    }
    service = subprocess.Popen([sys.executable, "-m", "service.server"], env=env)
    stack.callback(service.wait, 15)
    stack.callback(service.terminate)
    wait_serving(address, alive=lambda: service.poll() is None)
    key = Keys.parse(torchserve.key_file.read_text()).inference
    return {
        "refit service (gRPC)": via_refit(address, token),
        "TorchServe gRPC (direct)": via_torchserve_grpc(ports.grpc_inference, key),
        "TorchServe REST (direct)": via_torchserve_rest(ports.inference, key),
    }


def start_containers(stack: contextlib.ExitStack, tmp: Path) -> dict[str, Callable[[], Call]]:
    """The compose stack on this machine's engine; images are built (or found in the cache)."""
    from deploy.containers.stack import ComposeStack

    compose = ComposeStack(tmp)
    compose.build()
    stack.callback(compose.down)
    started = time.monotonic()
    compose.up()
    compose.wait_until_predicts(jpeg(data.coffee()))
    print(f"containers: cold up to the first Predict in {time.monotonic() - started:.0f} s")
    return {"containers: refit service (gRPC)": via_refit(compose.address, compose.admin_token)}


TARGETS = {"local": start_local, "containers": start_containers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=400, help="per path and concurrency")
    parser.add_argument("--target", action="append", choices=TARGETS, help="repeatable")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 8], help="calls in flight, e.g. 1 8 32"
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per level")
    args = parser.parse_args()
    images = [jpeg(data.coffee()), jpeg(data.chelsea()), jpeg(data.astronaut())]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        paths = {}
        for target in args.target or ["local"]:
            workdir = Path(tmp) / target
            workdir.mkdir()
            paths |= TARGETS[target](stack, workdir)
        for make in paths.values():  # warm every path and the workers
            load(make, images, 16, 1)
        results = {
            (name, c): result
            for c in args.concurrency
            for name, result in interleaved(paths, images, args.requests, c, args.rounds).items()
        }
    report(results)


def report(results: dict) -> None:
    """One table; ratios against direct TorchServe gRPC when measured, else the first path."""
    names = list(dict.fromkeys(name for name, _ in results))
    base = "TorchServe gRPC (direct)" if "TorchServe gRPC (direct)" in names else names[0]
    print(
        f"| path | concurrency | req/s | p50 ms | p99 ms | req/s vs {base} | p50 vs {base} "
        "| refused |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for (name, c), r in results.items():
        first = results[(base, c)]
        print(
            f"| {name} | {c} | {r['rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r['rps'] / first['rps']:.2f}x | {r['p50_ms'] - first['p50_ms']:+.1f} ms | "
            f"{r['refused']} |"
        )


if __name__ == "__main__":
    main()
