"""Few-shot accuracy as a user gets it (issue 27): N labelled Fashion-MNIST images per class in
total, uploaded to the store, retrained through the public gRPC API with default settings (so
Retrain's own validation hold-out comes out of those N), then scored through Predict on a fixed
set of held-out test images. Each pick is a different seeded draw of the N per class; each job is
a new model, so no gate baseline.

    PYTHONPATH=. .venv/bin/python bench/fewshot_user_path.py --shots 10 100 --picks 3 \
        --test-images 2000
    PYTHONPATH=. .venv/bin/python bench/fewshot_user_path.py --shots 10 --picks 1 \
        --test-images 200          # quick check

Needs Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
from PIL import Image
from running_stack import RunningStack, running_stack

from cli.client import ClientSettings, connect
from local_stack.demo import FASHION_CLASSES, FASHION_DIR, png, read_idx
from refit.storage import StorageSettings
from refit.v1 import refit_pb2 as pb
from refit.v1 import refit_pb2_grpc

BUCKET = "fewshot"


def load(split: str) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(FASHION_DIR / f"{split}-images-idx3-ubyte.gz")
    labels = read_idx(FASHION_DIR / f"{split}-labels-idx1-ubyte.gz")
    return images, labels


def pick(labels: np.ndarray, per_class: int, seed: int) -> list[int]:
    """``per_class`` indices of each class, drawn without replacement with ``seed``."""
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for c in range(len(FASHION_CLASSES)):
        chosen += rng.choice(np.flatnonzero(labels == c), per_class, replace=False).tolist()
    return chosen


def upload(stack: RunningStack, prefix: str, images: np.ndarray, labels: np.ndarray,
           indices: list[int]) -> str:  # fmt: skip
    store = StorageSettings(data_dir=stack.data_dir).open()
    store.ensure_bucket(BUCKET)

    def put(i: int) -> None:
        key = f"{prefix}/{FASHION_CLASSES[labels[i]]}/{i:05d}.png"
        store.put(BUCKET, key, png(Image.fromarray(images[i])))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, indices))
    return f"s3://{BUCKET}/{prefix}"


def retrain(stub: refit_pb2_grpc.RefitStub, model: str, uri: str) -> pb.Job:
    """A Retrain with default settings, followed to its end."""
    job = stub.Retrain(pb.RetrainRequest(model=model, dataset_uri=uri))
    for event in stub.WatchJob(pb.WatchJobRequest(id=job.id)):
        job = event.job
    if job.state != pb.SUCCEEDED:
        raise RuntimeError(f"job {job.id} ended {pb.JobState.Name(job.state)}: {job.error}")
    return job


def accuracy(stub: refit_pb2_grpc.RefitStub, model: str, version: str,
             test: list[tuple[bytes, str]]) -> float:  # fmt: skip
    def right(example: tuple[bytes, str]) -> bool:
        request = pb.PredictRequest(image=example[0], model=model, version=version)
        return stub.Predict(request, timeout=60).predictions[0].label == example[1]

    with ThreadPoolExecutor(4) as pool:
        return sum(pool.map(right, test)) / len(test)


def wait_served(stub: refit_pb2_grpc.RefitStub, model: str, version: str, image: bytes,
                timeout_s: float = 120.0) -> None:  # fmt: skip
    """Predict can name the new version only once the service has noticed it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            stub.Predict(pb.PredictRequest(image=image, model=model, version=version), timeout=30)
            return
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def held_out(images: np.ndarray, labels: np.ndarray, n: int) -> list[tuple[bytes, str]]:
    """The first ``n`` test images, balanced (n/10 per class): fixed across runs."""
    indices = pick(labels, n // len(FASHION_CLASSES), seed=12345)
    return [(png(Image.fromarray(images[i])), FASHION_CLASSES[labels[i]]) for i in indices]


def table(rows: list[dict]) -> str:
    lines = ["| shots/class | pick | accuracy | job s |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['shots']} | {r['pick']} | {r['accuracy']:.1%} | {r['job_s']:.0f} |"
              for r in rows]  # fmt: skip
    lines += ["", "| shots/class | mean acc | min | max | mean job s | max job s |",
              "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for shots in sorted({r["shots"] for r in rows}):
        acc = [r["accuracy"] for r in rows if r["shots"] == shots]
        secs = [r["job_s"] for r in rows if r["shots"] == shots]
        lines.append(f"| {shots} | {statistics.mean(acc):.1%} | {min(acc):.1%} | {max(acc):.1%}"
                     f" | {statistics.mean(secs):.0f} | {max(secs):.0f} |")  # fmt: skip
    return "\n".join(lines)


def run_all(stack: RunningStack, shot_counts: list[int], picks: int,
            test: list[tuple[bytes, str]]) -> list[dict]:  # fmt: skip
    train_x, train_y = load("train")
    rows = []
    with connect(ClientSettings(stack.address, token=stack.admin_token)) as channel:
        stub = refit_pb2_grpc.RefitStub(channel)
        for shots in shot_counts:
            for n in range(picks):
                model = f"fewshot-{shots}-{n}"
                uri = upload(stack, model, train_x, train_y, pick(train_y, shots, seed=n))
                start = time.monotonic()
                job = retrain(stub, model, uri)
                seconds = time.monotonic() - start
                wait_served(stub, model, job.version, test[0][0])
                acc = accuracy(stub, model, job.version, test)
                rows.append({"shots": shots, "pick": n, "accuracy": acc, "job_s": seconds})
                print(f"{shots}/class pick {n}: {acc:.1%} in {seconds:.0f} s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shots", type=int, nargs="+", default=[10, 100], help="per class")
    parser.add_argument("--picks", type=int, default=3, help="seeded data picks per shot count")
    parser.add_argument("--test-images", type=int, default=2000)
    args = parser.parse_args(argv)
    test_x, test_y = load("t10k")
    test = held_out(test_x, test_y, args.test_images)
    print(f"load before: {os.getloadavg()}", flush=True)
    with running_stack(trainer=True) as stack:
        rows = run_all(stack, args.shots, args.picks, test)
    print(f"load after: {os.getloadavg()}\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
