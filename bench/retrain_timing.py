"""Time from Retrain to the new default answering, split into queue, data, train, export, publish
and the service noticing; for a first version (no gate baseline) and later ones (the gate
evaluates the current default on the new job's validation split while TorchServe loads it).

Real components on free loopback ports: the embedded FileStore in a temp dir, TorchServe, the
trainer as its own process (``python -m trainer.server``), and two refit services in-process,
both following the same jobs:

- ``watched``: the production settings (watch 1 s, reconcile 30 s) and the bench's own WatchJob
  stream open through it. Its trainer subscription refreshes its catalog before it forwards
  SUCCEEDED (service/job_events.py), so it sees the new default before the bench does.
- ``monitor only``: no WatchJob through it, and its registry watch and reconcile passes set to
  an hour, so only its trainer subscription can refresh its catalog (the same refresh, with no
  watcher waiting for it).

Notice is measured on both from the trainer's ``finished_at`` (SUCCEEDED; same host clock) to
the first ListModels that shows the new default (ListModels reads the catalog and never
refreshes it), checked by a Predict through each service that answers with the new version.

    .venv/bin/python bench/retrain_timing.py --images 1000 --epochs 2 [--jobs 2] [--json out.json]
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
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
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
WATCHED, MONITOR_ONLY = "watched", "monitor only"
AN_HOUR = 3600.0

TOKEN = secrets.token_urlsafe(32)


def start_trainer(home: Path, torchserve: TorchServeProcess, port: int) -> subprocess.Popen:
    ts = torchserve.ports
    health = f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "REFIT_DATA_DIR": str(home),
        "REFIT_TRAINER_GRPC_ADDRESS": f"127.0.0.1:{port}",
        "REFIT_TRAINER_HEALTH_ADDRESS": health,
        "REFIT_TRAINER_METRICS_ADDRESS": f"127.0.0.1:{free_port()}",
        "REFIT_TORCHSERVE_INFERENCE": f"127.0.0.1:{ts.grpc_inference}",
        "REFIT_TORCHSERVE_MANAGEMENT": f"127.0.0.1:{ts.grpc_management}",
        "REFIT_TORCHSERVE_KEYS": torchserve.keys,
        "REFIT_TRAINER_DEVICE": "cpu",
    }
    log = (home / "trainer.log").open("a")
    process = subprocess.Popen([sys.executable, "-m", "trainer.server"], env=env, stdout=log,
                               stderr=subprocess.STDOUT)  # fmt: skip
    wait_serving(health, 180, lambda: process.poll() is None)
    return process


def timed_retrain(services: dict[str, refit_pb2_grpc.RefitStub], model: str, uri: str,
                  hp: pb.Hyperparameters, probe: bytes) -> dict:  # fmt: skip
    watched = services[WATCHED]
    start = time.time()
    job = watched.Retrain(pb.RetrainRequest(model=model, dataset_uri=uri, hyperparameters=hp))
    pollers: dict[str, Future] = {}
    with ThreadPoolExecutor(len(services)) as pool:
        for event in watched.WatchJob(pb.WatchJobRequest(id=job.id)):
            job = event.job
            if job.state in (pb.PUBLISHING, pb.SUCCEEDED) and job.version and not pollers:
                pollers = {
                    name: pool.submit(visible_at, stub, model, job.version)
                    for name, stub in services.items()
                }  # fmt: skip  (5 ms polls)
        if job.state != pb.SUCCEEDED:
            raise RuntimeError(f"job {job.id} ended {pb.JobState.Name(job.state)}: {job.error}")
        if not job.gate.promoted:
            raise RuntimeError(f"v{job.version} was not promoted: {job.gate.reason}")
        visible = {name: poller.result() for name, poller in pollers.items()}
    for name, stub in services.items():  # the new default answers through each service
        answer = stub.Predict(pb.PredictRequest(image=probe, model=model), timeout=30)
        if answer.version != job.version:
            raise RuntimeError(f"{name}: Predict answered v{answer.version}, not v{job.version}")
    finished_at = job.finished_at.ToNanoseconds() / 1e9  # the trainer's clock: this host's
    phases = {p: job.phase_seconds.get(p, 0.0) for p in PHASES}
    notice = {name: at - finished_at for name, at in visible.items()}
    phases["notice"] = notice[WATCHED]
    total = visible[WATCHED] - start
    return {
        "version": job.version,
        "total_s": total,
        "phases_s": phases,
        "notice_s": notice,
        "overhead_s": total - phases["train"],  # everything but training
        "publish_and_promotion_s": phases["publish"] + phases["notice"],
        "val_accuracy": job.metrics.get("val_accuracy", 0.0),
        "gate": job.gate.reason,
    }


def visible_at(stub: refit_pb2_grpc.RefitStub, model: str, version: str,
               timeout_s: float = 300.0) -> float:  # fmt: skip
    """Wall-clock time at which ListModels first shows ``version`` as the default."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        models = stub.ListModels(pb.ListModelsRequest(), timeout=10).models
        if any(m.name == model and m.default_version == version for m in models):
            return time.time()
        time.sleep(0.005)
    raise RuntimeError(f"v{version} of {model} not the default after {timeout_s:.0f}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--crop-size", type=int, default=64)
    parser.add_argument("--jobs", type=int, default=2, help="versions retrained one after another")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    home = Path(tempfile.mkdtemp(prefix="retrain-bench-"))
    storage = StorageSettings(data_dir=home)
    ports = TorchServePorts(*(free_port() for _ in range(5)))
    torchserve = TorchServeProcess(
        home / "torchserve", ports, allowed_urls_for((home / "objects").resolve().as_uri())
    )
    torchserve.start()
    trainer, services = None, {}
    try:
        trainer_port = free_port()
        trainer = start_trainer(home, torchserve, trainer_port)
        settings = ServiceSettings(
            grpc_address="127.0.0.1:0", health_address="127.0.0.1:0",
            torchserve_inference=f"127.0.0.1:{ports.grpc_inference}",
            torchserve_management=f"127.0.0.1:{ports.grpc_management}",
            torchserve_keys=torchserve.keys,
            trainer_address=f"127.0.0.1:{trainer_port}", storage=storage,
            auth=AuthSettings(admin_tokens=(TOKEN,)),
        )  # fmt: skip
        services = {WATCHED: build_server(settings), MONITOR_ONLY: build_server(settings)}
        services[WATCHED].start(settings.reconcile_interval_s, settings.watch_interval_s)
        services[MONITOR_ONLY].start(reconcile_interval_s=AN_HOUR, watch_interval_s=AN_HOUR)
        name, train, test = dataset(args.images // 10, 1)
        if len(train) < args.images:  # generated colours: 4 classes
            name, train, test = dataset(args.images // 4, 1)
        uri = upload(storage.open(), "datasets", "bench", train[: args.images])
        hp = pb.Hyperparameters(epochs=args.epochs, batch_size=32, crop_size=args.crop_size)
        with ExitStack() as channels:
            stubs = {
                label: refit_pb2_grpc.RefitStub(channels.enter_context(
                    connect(ClientSettings(f"127.0.0.1:{server.port}", token=TOKEN))
                ))
                for label, server in services.items()
            }  # fmt: skip
            runs = {}
            for n in range(1, args.jobs + 1):
                label = f"v{n} (gate evaluates v{n - 1})" if n > 1 else "v1 (no baseline)"
                runs[label] = timed_retrain(stubs, "bench", uri, hp, test[0].png)
    finally:
        for server in services.values():
            server.stop()
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
        "services": {
            WATCHED: "WatchJob open through it; watch 1 s, reconcile 30 s (the defaults)",
            MONITOR_ONLY: "no WatchJob; watch and reconcile every hour: only the trainer "
            "subscription refreshes",
        },
        "runs": runs,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
