"""Would grpc's asyncio API make the front door cheaper? A probe before migrating the service.

Minimal Predict proxies, each its own process, forward refit's Predict to a stand-in for
TorchServe's inference API (an asyncio gRPC server in another process that answers after
``--upstream-ms``, as a model worker would) and shape the answer as the service does:
- ``sync``: ``grpc.server`` with a thread pool and a blocking channel (the service's design today);
- ``aio``: ``grpc.aio.server`` with an asyncio channel, the whole call on one event loop;
- the sync one behind the service's own interceptor chain (access log, metrics, auth, stream
  limit, errors), to tell gRPC's cost from refit's interceptors'.
Each proxy's CPU time per call (user + system, all its threads, from /proc) is read around each
round, and each path's p50 is printed beside the p50 of calls straight to the stand-in. All
paths take turns in interleaved rounds, so drift in the machine's load hits each alike.
The service's ``maximum_concurrent_rpcs`` is left out: with exactly that many calls in flight
(32) a first version of this probe had calls refused with RESOURCE_EXHAUSTED, and the probe
measures gRPC's cost, not the limit.

Usage: PYTHONPATH=. .venv/bin/python bench/frontdoor_aio_probe.py [--requests 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from refit.netutil import free_port
from refit.torchserve_api import inference_pb2, inference_pb2_grpc
from refit.v1 import refit_pb2, refit_pb2_grpc
from service.auth import AuthSettings
from service.config import ServiceSettings
from service.server import _interceptors

TOKEN = "probe-token-" + "x" * 32

ANSWER = json.dumps(
    {"predictions": [{"label": f"class {i}", "score": 0.1, "index": i} for i in range(5)]}
).encode()


class StandInTorchServe(inference_pb2_grpc.InferenceAPIsServiceServicer):
    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    async def Predictions(self, request, context):
        await asyncio.sleep(self.delay_s)
        return inference_pb2.PredictionResponse(prediction=ANSWER)


def serve_upstream(port: int, delay_s: float) -> None:
    async def serve() -> None:
        server = grpc.aio.server()
        inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server(
            StandInTorchServe(delay_s), server
        )
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve())


def _upstream_request(request: refit_pb2.PredictRequest) -> inference_pb2.PredictionsRequest:
    return inference_pb2.PredictionsRequest(
        model_name=request.model,
        model_version=request.version,
        input={"data": request.image, "top_k": b"5"},
    )


def _response(request: refit_pb2.PredictRequest, answer: bytes) -> refit_pb2.PredictResponse:
    predictions = [refit_pb2.Prediction(**p) for p in json.loads(answer)["predictions"]]
    return refit_pb2.PredictResponse(
        request_id=request.request_id, model=request.model, version="1", predictions=predictions
    )


class SyncProxy(refit_pb2_grpc.RefitServicer):
    def __init__(self, upstream: str) -> None:
        self.stub = inference_pb2_grpc.InferenceAPIsServiceStub(grpc.insecure_channel(upstream))

    def Predict(self, request, context):
        answer = self.stub.Predictions(_upstream_request(request), timeout=10)
        return _response(request, answer.prediction)


class AioProxy(refit_pb2_grpc.RefitServicer):
    def __init__(self, upstream: str) -> None:
        self.stub = inference_pb2_grpc.InferenceAPIsServiceStub(grpc.aio.insecure_channel(upstream))

    async def Predict(self, request, context):
        answer = await self.stub.Predictions(_upstream_request(request), timeout=10)
        return _response(request, answer.prediction)


def serve_sync(port: int, upstream: str, interceptors: bool = False) -> None:
    settings = ServiceSettings(auth=AuthSettings(admin_tokens=(TOKEN,)))
    server = grpc.server(
        ThreadPoolExecutor(max_workers=settings.workers),
        interceptors=_interceptors(settings) if interceptors else None,
    )
    refit_pb2_grpc.add_RefitServicer_to_server(SyncProxy(upstream), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def serve_aio(port: int, upstream: str) -> None:
    async def serve() -> None:
        server = grpc.aio.server()
        refit_pb2_grpc.add_RefitServicer_to_server(AioProxy(upstream), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve())


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_load(
    address: str, requests: int, concurrency: int, image_bytes: int, direct: bool = False
) -> list[float]:
    """Latencies of ``requests`` Predicts, ``concurrency`` at once; ``direct``: to the stand-in."""
    channel = grpc.insecure_channel(address)
    request = refit_pb2.PredictRequest(image=b"\xff" * image_bytes, model="imagenet", version="1")
    if direct:
        upstream_request = _upstream_request(request)
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        call = lambda: stub.Predictions(upstream_request, timeout=30)  # noqa: E731
    else:
        stub = refit_pb2_grpc.RefitStub(channel)
        metadata = [("authorization", f"Bearer {TOKEN}")]
        call = lambda: stub.Predict(request, timeout=30, metadata=metadata)  # noqa: E731
    latencies: list[float] = []

    def one(_: int) -> None:
        start = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - start)

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests)))
    channel.close()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="per proxy and concurrency")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--upstream-ms", type=float, default=25.0)
    parser.add_argument("--image-kb", type=int, default=70, help="as big as the photos used")
    parser.add_argument("--idle-s", type=float, default=10.0, help="idle CPU measured this long")
    args = parser.parse_args()
    upstream_port = free_port()
    upstream = f"127.0.0.1:{upstream_port}"
    processes = [
        multiprocessing.Process(
            target=serve_upstream, args=(upstream_port, args.upstream_ms / 1000), daemon=True
        )
    ]
    proxies = {}
    variants = {
        "sync": (serve_sync, ()),
        "aio": (serve_aio, ()),
        "sync + the service's interceptors": (serve_sync, (True,)),
    }
    for name, (serve, extra) in variants.items():
        port = free_port()
        process = multiprocessing.Process(target=serve, args=(port, upstream, *extra), daemon=True)
        processes.append(process)
        proxies[name] = (process, f"127.0.0.1:{port}")
    for process in processes:
        process.start()
    time.sleep(2)
    for _, address in proxies.values():
        run_load(address, 20, 2, args.image_kb << 10)  # warm-up: connections, first-call costs
    print(f"load average at start: {os.getloadavg()}")
    idle = {name: cpu_seconds(process.pid) for name, (process, _) in proxies.items()}
    time.sleep(args.idle_s)
    for name, (process, _) in proxies.items():
        used = cpu_seconds(process.pid) - idle[name]
        print(f"  {name:34} idle: {1000 * used / args.idle_s:5.2f} ms CPU per second")
    image_bytes = args.image_kb << 10
    for concurrency in map(int, args.concurrency.split(",")):
        totals = {name: ([], 0.0) for name in proxies}
        direct: list[float] = []
        for _ in range(args.rounds):
            direct += run_load(
                upstream, args.requests // args.rounds, concurrency, image_bytes, True
            )
            for name, (process, address) in proxies.items():
                before = cpu_seconds(process.pid)
                latencies = run_load(
                    address, args.requests // args.rounds, concurrency, args.image_kb << 10
                )
                used = cpu_seconds(process.pid) - before
                done, cpu = totals[name]
                totals[name] = (done + latencies, cpu + used)
        print(f"concurrency {concurrency}, {args.requests} requests per path:")
        print(f"  {'direct to the stand-in':34} p50 {1000 * statistics.median(direct):6.2f} ms")
        for name, (latencies, cpu) in totals.items():
            print(
                f"  {name:34} p50 {1000 * statistics.median(latencies):6.2f} ms  "
                f"(+{1000 * (statistics.median(latencies) - statistics.median(direct)):5.2f})  "
                f"proxy CPU {1000 * cpu / len(latencies):5.2f} ms per call"
            )
    print(f"load average at end: {os.getloadavg()}")
    for process in processes:
        process.terminate()


if __name__ == "__main__":
    main()
