"""Time from Retrain to the new default answering, split into queue, data, train, export, publish
and the service noticing; for a first version (no gate baseline) and a second one (the gate
evaluates the current default on the new job's validation split while TorchServe loads it).

Real components on free loopback ports: the embedded FileStore in a temp dir, TorchServe, the
trainer as its own process (``python -m trainer.server``), the refit service in-process.

    .venv/bin/python bench/retrain_timing.py --images 1000 --epochs 2 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cli.client import ClientSettings, connect
from local_stack.demo import dataset, upload
from local_stack.torchserve import TorchServePorts, TorchServeProcess, allowed_urls_for
from refit.netutil import free_port, wait_serving
from refit.storage import StorageSettings
from refit.v1 import refit_pb2 as pb
from refit.v1 import refit_pb2_grpc
from service.auth import AuthSettings
from service.config import ServiceSettings
from service.server import build_server

PHASES = ("queue", "data", "train", "export", "publish")

TOKEN = secrets.token_urlsafe(32)


def start_trainer(home: Path, ts: TorchServePorts, port: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "REFIT_DATA_DIR": str(home),
        "REFIT_TRAINER_GRPC_ADDRESS": f"127.0.0.1:{port}",
        "REFIT_TRAINER_METRICS_ADDRESS": f"127.0.0.1:{free_port()}",
        "REFIT_TORCHSERVE_INFERENCE": f"127.0.0.1:{ts.grpc_inference}",
        "REFIT_TORCHSERVE_MANAGEMENT": f"127.0.0.1:{ts.grpc_management}",
        "REFIT_TRAINER_DEVICE": "cpu",
    }
    log = (home / "trainer.log").open("a")
    process = subprocess.Popen([sys.executable, "-m", "trainer.server"], env=env, stdout=log,
                               stderr=subprocess.STDOUT)  # fmt: skip
    wait_serving(f"127.0.0.1:{port}", 180, lambda: process.poll() is None)
    return process


def timed_retrain(stub, model: str, uri: str, hp: pb.Hyperparameters, probe: bytes) -> dict:
    start = time.perf_counter()
    job = stub.Retrain(pb.RetrainRequest(model=model, dataset_uri=uri, hyperparameters=hp))
    for event in stub.WatchJob(pb.WatchJobRequest(id=job.id)):
        job = event.job
    succeeded = time.perf_counter()
    if job.state != pb.SUCCEEDED:
        raise RuntimeError(f"job {job.id} ended {pb.JobState.Name(job.state)}: {job.error}")
    if not job.gate.promoted:
        raise RuntimeError(f"v{job.version} was not promoted: {job.gate.reason}")
    while True:  # the new default answering through the service
        answer = stub.Predict(pb.PredictRequest(image=probe, model=model), timeout=30)
        if answer.version == job.version:
            break
        time.sleep(0.01)
    answered = time.perf_counter()
    phases = {p: job.phase_seconds.get(p, 0.0) for p in PHASES}
    phases["notice"] = answered - succeeded  # job SUCCEEDED -> the service answers with it
    total = answered - start
    return {
        "version": job.version,
        "total_s": total,
        "phases_s": phases,
        "overhead_s": total - phases["train"],  # everything but training
        "publish_and_promotion_s": phases["publish"] + phases["notice"],
        "val_accuracy": job.metrics.get("val_accuracy", 0.0),
        "gate": job.gate.reason,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--crop-size", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    home = Path(tempfile.mkdtemp(prefix="retrain-bench-"))
    storage = StorageSettings(data_dir=home)
    ports = TorchServePorts(*(free_port() for _ in range(5)))
    torchserve = TorchServeProcess(
        home / "torchserve", ports, allowed_urls_for((home / "objects").resolve().as_uri())
    )
    torchserve.start()
    trainer = service = None
    try:
        trainer_port = free_port()
        trainer = start_trainer(home, ports, trainer_port)
        service = build_server(ServiceSettings(
            grpc_address="127.0.0.1:0", torchserve_inference=f"127.0.0.1:{ports.grpc_inference}",
            torchserve_management=f"127.0.0.1:{ports.grpc_management}",
            trainer_address=f"127.0.0.1:{trainer_port}", storage=storage,
            auth=AuthSettings(admin_tokens=(TOKEN,)),
        ))  # fmt: skip
        service.start(reconcile_interval_s=30)
        name, train, test = dataset(args.images // 10, 1)
        if len(train) < args.images:  # generated colours: 4 classes
            name, train, test = dataset(args.images // 4, 1)
        uri = upload(storage.open(), "datasets", "bench", train[: args.images])
        hp = pb.Hyperparameters(epochs=args.epochs, batch_size=32, crop_size=args.crop_size)
        with connect(ClientSettings(f"127.0.0.1:{service.port}", token=TOKEN)) as channel:
            stub = refit_pb2_grpc.RefitStub(channel)
            runs = {
                "first version (no baseline)": timed_retrain(stub, "bench", uri, hp, test[0].png),
                "second version (gate evaluates v1)": timed_retrain(
                    stub, "bench", uri, hp, test[0].png
                ),
            }
    finally:
        if service is not None:
            service.stop()
        if trainer is not None:
            trainer.terminate()
            trainer.wait(30)
        torchserve.stop()
    result = {
        "dataset": f"{args.images} {name} images",
        "epochs": args.epochs,
        "crop_size": args.crop_size,
        "cpus": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
        "runs": runs,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
