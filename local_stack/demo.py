"""``make demo``: retrain a classifier through the running stack (``make up``) and use it.

1. Uploads a small labelled dataset through the storage module: a Fashion-MNIST subset from
   /usr/share/datasets/fashion-mnist/*.gz when present (``apt-get install dataset-fashion-mnist``),
   otherwise generated colour images.
2. Calls Retrain on the refit service and follows the job (states, epochs, ETA).
3. Predicts held-out images with the new default and prints the accuracy and what happened.
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from PIL import Image, ImageDraw

from cli.client import ClientSettings, connect
from cli.jobs import progress_line, summary
from refit.netutil import wait_serving
from refit.shared_settings import SERVICE_ADDRESS
from refit.storage import ObjectStore, StorageSettings
from refit.v1 import refit_pb2 as pb
from refit.v1 import refit_pb2_grpc

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat",
                   "sandal", "shirt", "sneaker", "bag", "ankle-boot")  # fmt: skip
COLOURS = {"blue": (40, 60, 220), "green": (40, 190, 60), "red": (220, 40, 40),
           "yellow": (230, 220, 40)}  # fmt: skip


@dataclass(frozen=True)
class Example:
    label: str
    png: bytes


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def read_idx(path: Path) -> np.ndarray:
    """An MNIST-format (idx) gz file as an array: magic, dims, then uint8 data."""
    data = gzip.decompress(path.read_bytes())
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion(split: str, per_class: int) -> list[Example]:
    images = read_idx(FASHION_DIR / f"{split}-images-idx3-ubyte.gz")
    labels = read_idx(FASHION_DIR / f"{split}-labels-idx1-ubyte.gz")
    examples, counts = [], dict.fromkeys(range(10), 0)
    for image, label in zip(images, labels, strict=True):
        if counts[int(label)] < per_class:
            counts[int(label)] += 1
            examples.append(Example(FASHION_CLASSES[label], png(Image.fromarray(image))))
    return examples


def colours(per_class: int, seed: int) -> list[Example]:
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(per_class):
        for name, fill in COLOURS.items():
            noise = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) // 3 + 60
            image = Image.fromarray(noise.astype(np.uint8))
            low, high = rng.integers(0, 12, 2), rng.integers(36, 48, 2)
            ImageDraw.Draw(image).ellipse([*map(int, low), *map(int, high)], fill=fill)
            examples.append(Example(name, png(image)))
    return examples


def dataset(per_class: int, held_out: int) -> tuple[str, list[Example], list[Example]]:
    if (FASHION_DIR / "train-images-idx3-ubyte.gz").exists():
        return "Fashion-MNIST", fashion("train", per_class), fashion("t10k", held_out)
    return "generated colours", colours(per_class, seed=0), colours(held_out, seed=1)


def upload(store: ObjectStore, bucket: str, prefix: str, examples: list[Example]) -> str:
    store.ensure_bucket(bucket)
    for n, example in enumerate(examples):
        store.put(bucket, f"{prefix}/{example.label}/{n:05d}.png", example.png)
    return f"s3://{bucket}/{prefix}"


def follow(stub: refit_pb2_grpc.RefitStub, job_id: str) -> pb.Job:
    state, job = None, None
    for event in stub.WatchJob(pb.WatchJobRequest(id=job_id)):
        job = event.job
        if job.state != state:
            state = job.state
            print(f"  [{time.strftime('%H:%M:%S')}] {pb.JobState.Name(state).lower()}", flush=True)
        if event.kind == "progress" and job.progress.epoch_end:
            print("    " + progress_line(job.progress), flush=True)
    return job


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", default=SERVICE_ADDRESS.value(os.environ))
    parser.add_argument("--model", default="demo")
    parser.add_argument("--per-class", type=int, default=40, help="training images per class")
    parser.add_argument("--held-out", type=int, default=10, help="test images per class")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--crop-size", type=int, default=64)
    args = parser.parse_args(argv)

    wait_serving(args.address, timeout_s=30)
    store = StorageSettings.from_env().open()
    name, train, test = dataset(args.per_class, args.held_out)
    uri = upload(store, "datasets", f"demo-{int(time.time())}", train)
    print(f"1. uploaded {len(train)} {name} images to {uri}")

    stub = refit_pb2_grpc.RefitStub(connect(ClientSettings.from_env(args.address)))
    hp = pb.Hyperparameters(epochs=args.epochs, batch_size=32, crop_size=args.crop_size)
    request = pb.RetrainRequest(model=args.model, dataset_uri=uri, hyperparameters=hp,
                                created_by=os.environ.get("USER", "demo"))  # fmt: skip
    try:
        job = stub.Retrain(request, timeout=30)
    except grpc.RpcError as exc:
        print(f"Retrain failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(f"2. Retrain -> job {job.id}; following it:")
    job = follow(stub, job.id)
    print("   " + summary(job).replace("\n", "\n   "))
    if job.state != pb.SUCCEEDED:
        return 1

    hits, shown = 0, 0
    for example in test:
        answer = stub.Predict(pb.PredictRequest(image=example.png, model=args.model), timeout=30)
        best = answer.predictions[0]
        hits += best.label == example.label
        if shown < 5:
            shown += 1
            score = f"{best.score:.0%}"
            print(f"     {example.label:12} -> {best.label:12} ({score}, v{answer.version})")
    chance = 1 / len({e.label for e in test})
    print(f"3. {args.model} (default v{answer.version}) on {len(test)} held-out images: "
          f"accuracy {hits / len(test):.1%} (chance {chance:.0%})")  # fmt: skip
    model = stub.GetModel(pb.GetModelRequest(name=args.model), timeout=10)
    for version in model.versions:
        accuracy = version.metrics.get("val_accuracy", 0.0)
        print(f"   v{version.version}: {version.state:9} val_accuracy {accuracy:.3f} "
              f"(job {version.lineage.job_id or '-'})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
