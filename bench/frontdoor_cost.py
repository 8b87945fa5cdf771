"""Where Predict time goes in the refit service.

Default: the service's own CPU per Predict, and a sampled profile of the service process, next
to direct TorchServe gRPC calls on the same stack. CPU time per call (from /proc, user + system,
all of the service's threads) is what the service adds to every Predict whatever the machine's
load; wall-clock p50s are printed beside it, both paths interleaved in rounds. With
``--profile`` (needs ``py-spy``), the service is sampled during the refit rounds at concurrency
1 and its samples are summed by function.

``--breakdown``: the same call measured step by step in one process (raw TorchServe stub, the
service's TorchServe client, Predictor.predict, the full gRPC service), p50 of ``--calls`` calls
per step and round; then the service's own per-call costs without TorchServe: a bare Python
gRPC round trip (a health Check on a server with nothing else), the image header checks and the
token check.

Usage: PYTHONPATH=. .venv/bin/python bench/frontdoor_cost.py [--requests 300] [--profile]
           [--breakdown [--calls 150] [--rounds 2]]
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from PIL import Image
from predict_latency import jpeg, load, summarize, via_refit, via_torchserve_grpc
from running_stack import running_stack
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

TOKEN = secrets.token_urlsafe(32)  # --breakdown measures the full gRPC path with auth on


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sampled(pid: int, out: Path) -> subprocess.Popen:
    spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    if spy is None:
        raise SystemExit("--profile needs py-spy (pip install py-spy)")
    return subprocess.Popen(
        [spy, "record", "-p", str(pid), "-o", str(out), "-f", "raw", "-r", "200", "--nonblocking"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def summed_by_function(collapsed: Path, top: int) -> tuple[list, list]:
    """From py-spy's raw (collapsed-stack) output: each function's share of the samples with it
    on the stack (inclusive), and with it at the top of the stack (its own time)."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [_short(frame) for frame in stack.split(";")]
        total += int(count)
        own[frames[-1]] += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)
    share = lambda counts: [(f, n / total) for f, n in counts.most_common(top)]  # noqa: E731
    return (share(inclusive), share(own)) if total else ([], [])


def _short(frame: str) -> str:
    """``function (path/to/file.py:line)`` -> ``function (file.py:line)``."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit('/', 1)[-1]}"


def frontdoor(args: argparse.Namespace) -> None:
    images = [jpeg(data.coffee()), jpeg(data.astronaut()), jpeg(data.chelsea())]
    with running_stack() as stack, tempfile.TemporaryDirectory() as tmp:
        port = int(stack.torchserve_inference.rsplit(":", 1)[1])
        paths = {
            "refit": via_refit(stack.address, stack.predict_token),
            "torchserve": via_torchserve_grpc(port, stack.torchserve_inference_key),
        }
        for concurrency in map(int, args.concurrency.split(",")):
            per_round = args.requests // args.rounds
            results = {name: ([], 0.0, 0.0) for name in paths}
            spy = None
            if args.profile and concurrency == 1:
                spy = sampled(stack.service_pid, Path(tmp) / "service.txt")
                time.sleep(1)
            for _ in range(args.rounds):
                for name, make in paths.items():
                    before = cpu_seconds(stack.service_pid)
                    latencies, seconds = load(make, images, per_round, concurrency)
                    used = cpu_seconds(stack.service_pid) - before
                    done, total, cpu = results[name]
                    results[name] = (done + latencies, total + seconds, cpu + used)
            if spy:
                spy.send_signal(signal.SIGINT)
                spy.wait(60)
            print(f"\nconcurrency {concurrency}, {args.requests} requests per path")
            for name, (latencies, seconds, cpu) in results.items():
                summary = summarize(latencies, seconds)
                print(
                    f"  {name:10} p50 {summary['p50_ms']:7.2f} ms  {summary['rps']:6.1f} req/s  "
                    f"service CPU {1000 * cpu / len(latencies):5.2f} ms per call"
                )
            if spy:
                inclusive, own = summed_by_function(Path(tmp) / "service.txt", 20)
                for title, rows in (("on the stack", inclusive), ("own time", own)):
                    print(f"  service profile, share of samples, {title}:")
                    for frame, share in rows:
                        print(f"    {100 * share:5.1f}%  {frame}")


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


def breakdown(args: argparse.Namespace) -> None:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="per path and concurrency")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="sample the service with py-spy")
    parser.add_argument("--breakdown", action="store_true", help="step by step, in one process")
    parser.add_argument("--calls", type=int, default=150, help="per step and round (--breakdown)")
    args = parser.parse_args()
    (breakdown if args.breakdown else frontdoor)(args)


if __name__ == "__main__":
    main()
