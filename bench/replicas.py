"""Predict throughput through the service with 1 and 2 TorchServe replicas, side by side.

Starts its own stack on free ports: the embedded store, two TorchServe instances (one CPU worker
each), and two service processes, one sending Predicts to replica A only and one spreading them
over A and B. The two configurations are interleaved in 5 rounds per concurrency level (8 and 16)
so drift in machine load hits both alike. Usage: .venv/bin/python bench/replicas.py [--requests N]
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from predict_latency import interleaved, jpeg, load, via_refit
from skimage import data

from local_stack.torchserve import TorchServePorts, TorchServeProcess, allowed_urls_for
from refit.netutil import free_port, wait_serving
from refit.storage import StorageSettings
from trainer.base_model import publish_base_model

TOKEN = secrets.token_urlsafe(32)  # the admin token of both services


def start_torchserve(home: Path, allowed_urls: str) -> TorchServeProcess:
    process = TorchServeProcess(
        home, TorchServePorts(*(free_port() for _ in range(5))), allowed_urls
    )
    process.start()
    return process


def start_service(data_dir: str, replicas: list[TorchServeProcess]) -> tuple[subprocess.Popen, str]:
    address = f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "REFIT_DATA_DIR": data_dir,
        "REFIT_GRPC_ADDRESS": address,
        "REFIT_HEALTH_ADDRESS": f"127.0.0.1:{free_port()}",
        "REFIT_METRICS_ADDRESS": f"127.0.0.1:{free_port()}",
        "REFIT_TORCHSERVE_INFERENCE": ",".join(
            f"127.0.0.1:{r.ports.grpc_inference}" for r in replicas
        ),
        "REFIT_TORCHSERVE_MANAGEMENT": ",".join(
            f"127.0.0.1:{r.ports.grpc_management}" for r in replicas
        ),
        "REFIT_TORCHSERVE_KEYS": "file:" + ",".join(str(r.key_file) for r in replicas),
        "REFIT_ADMIN_TOKEN": TOKEN,
    }
    service = subprocess.Popen([sys.executable, "-m", "service.server"], env=env)
    wait_serving(address, timeout_s=300, alive=lambda: service.poll() is None)
    return service, address


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=400, help="per configuration and level")
    args = parser.parse_args()
    images = [jpeg(data.coffee()), jpeg(data.chelsea()), jpeg(data.astronaut())]
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        publish_base_model(StorageSettings(data_dir=Path(tmp)).open(), "refit")
        allowed = allowed_urls_for((Path(tmp) / "objects").as_uri())
        a, b = (start_torchserve(Path(tmp) / name, allowed) for name in ("ts-a", "ts-b"))
        stack.callback(a.stop)
        stack.callback(b.stop)
        paths = {}
        for name, replicas in (("1 replica", [a]), ("2 replicas", [a, b])):
            service, address = start_service(tmp, replicas)
            stack.callback(service.wait, 15)
            stack.callback(service.terminate)
            paths[name] = via_refit(address, TOKEN)
        for make in paths.values():  # warm both services and every worker
            load(make, images, 32, 4)
        results = {
            (name, c): result
            for c in (8, 16)
            for name, result in interleaved(paths, images, args.requests, c).items()
        }
    print(f"cores: {os.cpu_count()}, load average at the end: {os.getloadavg()[0]:.1f}")
    print("| TorchServe replicas | concurrency | req/s | p50 ms | p99 ms | req/s vs 1 replica |")
    print("|---|---|---|---|---|---|")
    for (name, c), r in results.items():
        base = results[("1 replica", c)]
        print(
            f"| {name} | {c} | {r['rps']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
            f"{r['rps'] / base['rps']:.2f}x |"
        )


if __name__ == "__main__":
    main()
