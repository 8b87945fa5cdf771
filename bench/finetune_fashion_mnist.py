"""Few-shot transfer on Fashion-MNIST through the real training path (not a test).

For 10 and 100 training images per class (drawn from the 60k train split), each run streams its
data from the object store, fine-tunes EfficientNet-Lite0 with ``trainer.train.train_and_package``
and stores an archive; the served artifact (TorchScript inside the .mar) is then scored on the
full 10k test split, also streamed from the store. Validation during training (best epoch, early
stopping) uses other train images (--val-per-class, default 50), never test images.

Modes: ``frozen`` (ImageNet weights, stem + first 10 of 16 blocks frozen), ``full`` (ImageNet
weights, nothing frozen), ``scratch`` (random init, nothing frozen): same epochs, LR schedule
and augmentation.

Also measures training throughput of the engine (streamed, augmented, per-epoch validation
excluded) against a plain in-memory torchvision-style loop on the same model and batch size.

    PYTHONPATH=. .venv/bin/python bench/finetune_fashion_mnist.py               # FileStore
    PYTHONPATH=. .venv/bin/python bench/finetune_fashion_mnist.py --store moto  # moto S3
Needs Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from refit.storage import FileStore, ObjectStore, S3Store, StorageSettings
from trainer.backbones import BackboneRegistry
from trainer.config import NO_FREEZE, Augmentation, TrainConfig
from trainer.data import open_dataset
from trainer.engine import evaluate
from trainer.finetune import FineTuneModel
from trainer.hardware import setup_hardware
from trainer.train import (
    build_model,
    fit,
    open_datasets,
    preprocessing_for,
    train_and_package,
)
from trainer.transforms import eval_transform, train_transform

DATA = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
           "boot"]  # fmt: skip
BUCKET = "bench"


def read_idx(path: Path) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes())
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_split(name: str) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(DATA / f"{name}-images-idx3-ubyte.gz")
    labels = read_idx(DATA / f"{name}-labels-idx1-ubyte.gz")
    return images, labels


def pick(labels: np.ndarray, per_class: int, rng: np.random.Generator, exclude: set) -> list:
    chosen = []
    for c in range(len(CLASSES)):
        pool = [i for i in np.flatnonzero(labels == c) if i not in exclude]
        chosen += list(rng.choice(pool, per_class, replace=False))
    return chosen


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array, mode="L").save(out, format="PNG")
    return out.getvalue()


def upload(store: ObjectStore, prefix: str, split: str, images, labels, indices) -> None:
    def put(i: int) -> None:
        store.put(BUCKET, f"{prefix}/{split}/{CLASSES[labels[i]]}/{i:05d}.png", png(images[i]))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, indices))


@dataclass
class Stores:
    store: ObjectStore
    kind: str
    moto: subprocess.Popen | None = None

    def close(self) -> None:
        if self.moto is not None:
            self.moto.terminate()
            self.moto.wait(10)


def open_store(kind: str, workdir: Path) -> Stores:
    if kind == "file":
        return Stores(FileStore(workdir / "objects"), "FileStore (embedded, on local disk)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    moto = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    while not _listening(port):
        if moto.poll() is not None:
            raise RuntimeError("moto_server exited")
        time.sleep(0.1)
    settings = StorageSettings(endpoint=f"http://127.0.0.1:{port}", access_key="x", secret_key="x")
    return Stores(S3Store(settings), "moto S3 server (loopback)", moto)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def prepare(
    store: ObjectStore, shots: list[int], test_limit: int | None, val_per_class: int
) -> dict[str, str]:
    """Upload every few-shot dataset and the test split once; returns name -> URI."""
    train_x, train_y = load_split("train")
    test_x, test_y = load_split("t10k")
    store.ensure_bucket(BUCKET)
    rng = np.random.default_rng(0)
    val_idx = pick(train_y, val_per_class, rng, set())
    uris = {}
    for n in shots:
        train_idx = pick(train_y, n, np.random.default_rng(n), set(val_idx))
        prefix = f"fmnist-{n}"
        upload(store, prefix, "train", train_x, train_y, train_idx)
        upload(store, prefix, "val", train_x, train_y, val_idx)
        uris[f"{n}"] = f"s3://{BUCKET}/{prefix}"
    test_idx = range(len(test_y)) if test_limit is None else range(test_limit)
    # The test split as the "train" folder of its own prefix: opened whole, unshuffled.
    upload(store, "fmnist-test", "train", test_x, test_y, test_idx)
    upload(store, "fmnist-test", "val", test_x, test_y, test_idx[:10])
    uris["test"] = f"s3://{BUCKET}/fmnist-test"
    return uris


def base_config(uri: str, out: str, epochs: int, workers: int = 2) -> TrainConfig:
    return TrainConfig(
        dataset=uri,
        out=out,
        epochs=epochs,
        batch_size=32,
        lr=2e-3,
        weight_decay=0.05,
        label_smoothing=0.1,
        crop_size=96,
        resize_size=96,
        augmentation=Augmentation(crop_scale=(0.7, 1.0), hflip=0.5),
        workers=workers,
        bucket=BUCKET,
        resume=False,
        log_every=1000,
    )


MODES = {
    "frozen": {"pretrained": True, "freeze": None},  # backbone default: 10 of 16 blocks
    "frozen14": {"pretrained": True, "freeze": 14},  # only the last 2 blocks + head conv train
    "full": {"pretrained": True, "freeze": NO_FREEZE},
    "scratch": {"pretrained": False, "freeze": NO_FREEZE},
}


def score_archive(
    store: ObjectStore, archive_key: str, test_uri: str, config: TrainConfig
) -> tuple[float, int]:
    """Accuracy of the served artifact (the .mar's TorchScript) on the streamed test split."""
    with zipfile.ZipFile(io.BytesIO(store.get(BUCKET, archive_key))) as mar:
        scripted = torch.jit.load(io.BytesIO(mar.read("model.pt")))
    transform = eval_transform(preprocessing_for(config))
    test = open_dataset(test_uri, store=store, split="train", val_fraction=0.0, shuffle=False,
                        transform=transform, rank=0, world_size=1)  # fmt: skip
    loader = torch.utils.data.DataLoader(test, batch_size=128, num_workers=2)
    hw = setup_hardware("cpu")
    result = evaluate(scripted, torch.nn.CrossEntropyLoss(), loader, hw, len(CLASSES))
    return result.accuracy, result.images


def run(store: ObjectStore, uris: dict, shots: int, mode: str, epochs: int, workers: int) -> dict:
    config = base_config(uris[str(shots)], f"fmnist-{shots}-{mode}", epochs, workers)
    config = replace(config, **MODES[mode])
    started = time.perf_counter()
    result = train_and_package(config, store)
    wall = time.perf_counter() - started
    accuracy, images = score_archive(store, result.archive_key, uris["test"], config)
    history = result.history
    steady = [h["images_per_second"] for h in history[1:]] or [history[0]["images_per_second"]]
    row = {
        "shots": shots, "mode": mode, "epochs": epochs, "workers": workers,
        "test_accuracy": accuracy,
        "test_images": images, "val_accuracy": result.metrics["val_accuracy"],
        "best_epoch": int(result.metrics["best_epoch"]) + 1,
        "train_seconds": result.metrics["train_seconds"], "job_seconds": wall,
        "train_images_per_second": float(np.median(steady)),
        "data_wait_ratio": float(np.median([h["data_wait_ratio"] for h in history])),
    }  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def throughput(uri: str, store: ObjectStore, rounds: int) -> dict:
    """Engine epoch (streamed from the store, augmented in DataLoader workers) vs a plain
    torchvision-style epoch over in-memory, already-transformed tensors; same model, frozen
    depth, optimizer and batch size. Alternated ``rounds`` times (the machine is shared), each
    figure the second epoch of its round (the first warms up); medians reported."""
    config = replace(base_config(uri, "throughput", 2), **MODES["frozen"])
    pre = preprocessing_for(config)
    hw = setup_hardware("cpu")
    engine, plain = [], []
    for _ in range(rounds):
        data = open_datasets(config, store, hw, train_transform(pre, config.augmentation),
                             eval_transform(pre))  # fmt: skip
        model = _frozen_model(config, store)
        result = fit(model, data, config, hw, freeze=model.spec.default_freeze)
        engine.append(result.history[-1]["images_per_second"])
        plain.append(_plain_epochs(config, store, data.train, epochs=2)[-1])
        print(json.dumps({"engine_images_per_second": engine[-1],
                          "plain_images_per_second": plain[-1]}), flush=True)  # fmt: skip
    row = {
        "engine_images_per_second": float(np.median(engine)),
        "plain_images_per_second": float(np.median(plain)),
        "rounds": rounds,
    }
    row["ratio"] = row["engine_images_per_second"] / row["plain_images_per_second"]
    return row


def _frozen_model(config: TrainConfig, store: ObjectStore) -> FineTuneModel:
    torch.manual_seed(0)
    model, _ = build_model(config, store, CLASSES, BackboneRegistry())
    return model


def _plain_epochs(config: TrainConfig, store: ObjectStore, dataset, epochs: int) -> list[float]:
    tensors = list(dataset)  # decoded and augmented once, kept in memory
    images = torch.stack([t for t, _ in tensors])
    labels = torch.tensor([label for _, label in tensors])
    model = _frozen_model(config, store)
    model.freeze(model.spec.default_freeze)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=config.lr, weight_decay=0.05)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images, labels), batch_size=config.batch_size, shuffle=True
    )
    rates = []
    for _ in range(epochs):
        model.train()
        started, seen = time.perf_counter(), 0
        for x, y in loader:
            loss = criterion(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += y.numel()
        rates.append(seen / (time.perf_counter() - started))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=("file", "moto"), default="file")
    parser.add_argument("--shots", type=int, nargs="+", default=[100, 10])
    parser.add_argument("--modes", nargs="*", default=["frozen", "full", "scratch"],
                        choices=list(MODES))  # fmt: skip
    parser.add_argument("--epochs", type=int, nargs="+", default=[15, 30],
                        help="epochs per --shots entry")  # fmt: skip
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch default")
    parser.add_argument("--val-per-class", type=int, default=50, help="validation images")
    parser.add_argument("--test-limit", type=int, default=None, help="fewer test images (dev)")
    parser.add_argument("--throughput-rounds", type=int, default=3, help="0: skip")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    if args.threads:
        # On a shared, oversubscribed CPU, OpenMP threads spin against each other; 1 can be faster.
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        stores = open_store(args.store, Path(tmp))
        try:
            t0 = time.perf_counter()
            uris = prepare(stores.store, args.shots, args.test_limit, args.val_per_class)
            print(f"# store: {stores.kind}; upload {time.perf_counter() - t0:.0f} s", flush=True)
            rows = [
                run(stores.store, uris, shots, mode, epochs, args.workers)
                for shots, epochs in zip(args.shots, args.epochs, strict=True)
                for mode in args.modes
            ]
            if args.throughput_rounds and 100 in args.shots:
                rows.append(throughput(uris["100"], stores.store, args.throughput_rounds))
                print(json.dumps(rows[-1]), flush=True)
        finally:
            stores.close()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
