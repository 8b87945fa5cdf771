"""Few-shot transfer on Fashion-MNIST through the real training path (not a test).

For 10 and 100 training images per class (drawn from the 60k train split), each run streams its
data from the object store, fine-tunes EfficientNet-Lite0 with ``trainer.train.train_and_package``
and stores an archive; the served artifact (the .mar's ONNX model, fp32 or int8) is then scored on
the full 10k test split, also streamed from the store (``--flip-tta``: also with flip test-time
augmentation, for information: the served model does not do it; ``--compare-runtimes``: also
the same weights exported to TorchScript, as archives were before, and to fp32 ONNX). Validation
during training (epoch selection) uses other train images, never test images. Every run starts
from training's default recipe for its set (trainer/recipe.py: what Retrain uses when a request
leaves the hyperparameters empty); modes and ``--set`` pairs change it.

Modes: ``default`` (the recipe as is), ``frozen`` (stem + first 10 of 16 blocks frozen), ``full``
(nothing frozen), ``scratch`` (random init, nothing frozen).

Also measures training throughput of the engine (streamed, augmented, per-epoch validation
excluded) against a plain in-memory torchvision-style loop on the same model and batch size.

    PYTHONPATH=. .venv/bin/python bench/finetune_fashion_mnist.py               # FileStore
    PYTHONPATH=. .venv/bin/python bench/finetune_fashion_mnist.py --store moto  # moto S3
    ... --shots 100 --modes frozen --set epochs=20 --set augmentation.rotation=10  # variations
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from served_models import same_weights, served_model, stored_model

from refit.storage import FileStore, ObjectStore, S3Store, StorageSettings
from trainer import recipe
from trainer.backbones import BackboneRegistry
from trainer.config import NO_FREEZE, TrainConfig
from trainer.data import open_dataset
from trainer.datasets import open_datasets
from trainer.engine import evaluate
from trainer.finetune import FineTuneModel
from trainer.hardware import setup_hardware
from trainer.loop import fit
from trainer.preprocessing import Preprocessing
from trainer.starting_point import build_model
from trainer.train import train_and_package
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
    store: ObjectStore, val_per_class: dict[int, int], test_limit: int | None
) -> dict[str, str]:
    """Upload every few-shot dataset (shots -> validation images per class) and the test split
    once; returns name -> URI."""
    train_x, train_y = load_split("train")
    test_x, test_y = load_split("t10k")
    store.ensure_bucket(BUCKET)
    uris = {}
    for n, val_n in val_per_class.items():
        val_idx = pick(train_y, val_n, np.random.default_rng(0), set())
        train_idx = pick(train_y, n, np.random.default_rng(n), set(val_idx))
        prefix = f"fmnist-{n}"
        upload(store, prefix, "train", train_x, train_y, train_idx)
        upload(store, prefix, "val", train_x, train_y, val_idx)
        uris[f"{n}"] = f"s3://{BUCKET}/{prefix}"
    test_idx = range(len(test_y)) if test_limit is None else limited(test_y, test_limit)
    # The test split as the "train" folder of its own prefix: opened whole, unshuffled.
    upload(store, "fmnist-test", "train", test_x, test_y, test_idx)
    upload(store, "fmnist-test", "val", test_x, test_y, test_idx[:10])
    uris["test"] = f"s3://{BUCKET}/fmnist-test"
    return uris


def limited(labels: np.ndarray, limit: int) -> list[int]:
    """About ``limit`` test images, every class alike: the scorer numbers the classes by the
    folders it finds, so a class missing from the split would shift every label after it."""
    return sorted(pick(labels, max(limit // len(CLASSES), 1), np.random.default_rng(0), set()))


VAL_PER_CLASS = {10: 20, 100: 50}  # validation images per class (epoch selection) by set size


def val_per_class(shots: int) -> int:
    return VAL_PER_CLASS.get(shots, max(20, shots // 2))


def base_config(uri: str, out: str) -> TrainConfig:
    """Training's own defaults: what Retrain does when a request leaves them empty."""
    return TrainConfig(dataset=uri, out=out, bucket=BUCKET, resume=False, log_every=1000)


def recipe_config(store: ObjectStore, uri: str, out: str, pairs: list[str]) -> TrainConfig:
    """The default recipe for the set at ``uri`` (trainer/recipe.py), then ``--set`` pairs."""
    config = base_config(uri, out)
    return with_overrides(recipe.complete(config, recipe.survey(config, store)), pairs)


def with_overrides(config: TrainConfig, pairs: list[str]) -> TrainConfig:
    """Apply ``--set KEY=VALUE`` pairs (``augmentation.rotation=10`` reaches the augmentation);
    values are JSON (numbers, lists, null) or else plain strings."""
    fields, aug = {}, {}
    for pair in pairs:
        key, _, text = pair.partition("=")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        value = tuple(value) if isinstance(value, list) else value
        if key.startswith("augmentation."):
            aug[key.removeprefix("augmentation.")] = value
        else:
            fields[key] = value
    return replace(config, augmentation=replace(config.augmentation, **aug), **fields)


MODES = {  # --set pairs over the default recipe
    "default": [],  # as Retrain runs it
    "frozen": ["freeze=10"],  # stem + first 10 of 16 blocks (EfficientNet-Lite0)
    "frozen14": ["freeze=14"],  # only the last 2 blocks + head conv train
    "full": [f"freeze={NO_FREEZE}"],
    "scratch": ["pretrained=false", f"freeze={NO_FREEZE}"],
}


class FlipAveraged(torch.nn.Module):
    """Test-time augmentation: mean of the logits for the image and its mirror image."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.model(x) + self.model(x.flip(-1))) / 2


def score_model(
    model: torch.nn.Module, store: ObjectStore, test_uri: str, config: TrainConfig
) -> tuple[float, int]:
    transform = eval_transform(Preprocessing.for_config(config))
    test = open_dataset(test_uri, store=store, split="train", val_fraction=0.0, shuffle=False,
                        transform=transform, rank=0, world_size=1)  # fmt: skip
    loader = torch.utils.data.DataLoader(test, batch_size=128, num_workers=2)
    result = evaluate(model, torch.nn.CrossEntropyLoss(), loader, setup_hardware("cpu"),
                      len(CLASSES))  # fmt: skip
    return result.accuracy, result.images


def score_archive(
    store: ObjectStore, archive_key: str, test_uri: str, config: TrainConfig, flip_tta: bool
) -> tuple[float, float | None, int]:
    """Accuracy of the served artifact (the .mar's model) on the streamed test split, as
    served and (``flip_tta``) with flip test-time augmentation."""
    served = served_model(store.get(BUCKET, archive_key))
    accuracy, images = score_model(served, store, test_uri, config)
    flipped = score_model(FlipAveraged(served), store, test_uri, config)[0] if flip_tta else None
    return accuracy, flipped, images


def run(store: ObjectStore, uris: dict, shots: int, mode: str, sets: list, flip_tta: bool,
        compare_runtimes: bool = False) -> dict:  # fmt: skip
    uri = uris[str(shots)]
    config = recipe_config(store, uri, f"fmnist-{shots}-{mode}", [*MODES[mode], *sets])
    started, cpu_started = time.perf_counter(), time.process_time()
    result = train_and_package(config, store)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    accuracy, flip_accuracy, images = score_archive(
        store, result.archive_key, uris["test"], config, flip_tta
    )
    history = result.history
    steady = [h["images_per_second"] for h in history[1:]] or [history[0]["images_per_second"]]
    row = {
        "shots": shots, "mode": mode, "epochs": config.epochs, "batch_size": config.batch_size,
        "crop_size": config.crop_size, "freeze": config.freeze,
        "augmentation": asdict(config.augmentation), "set": sets,
        "test_accuracy": accuracy, "test_accuracy_flip_tta": flip_accuracy,
        "test_images": images, "val_accuracy": result.metrics["val_accuracy"],
        "best_epoch": int(result.metrics["best_epoch"]) + 1,
        "train_seconds": result.metrics["train_seconds"], "job_seconds": wall,
        "job_cpu_seconds": cpu,  # this process's threads: on a shared machine, wall time / cores
        "train_images_per_second": float(np.median(steady)),
        "data_wait_ratio": float(np.median([h["data_wait_ratio"] for h in history])),
        "val_curve": [round(h["val_accuracy"], 3) for h in history],
        "precision": result.precision, "val_accuracy_fp32": result.fp32_accuracy,
        "val_accuracy_int8": result.int8_accuracy,
        "export_seconds": result.metrics.get("export_seconds"),
        "quantize_seconds": result.metrics.get("quantize_seconds"),
    }  # fmt: skip
    if compare_runtimes:  # the version's weights, exported each way
        model = stored_model(store, BUCKET, result.weights_key)
        for runtime, exported in same_weights(model, config.crop_size).items():
            row[f"test_accuracy_{runtime}"] = score_model(exported, store, uris["test"], config)[0]
    print(json.dumps(row), flush=True)
    return row


def throughput(uri: str, store: ObjectStore, rounds: int, sets: list) -> dict:
    """Engine epoch (streamed from the store, augmented in DataLoader workers) vs a plain
    torchvision-style epoch over in-memory, already-transformed tensors; same model, frozen
    depth, optimizer and batch size. The plain loop runs twice: NCHW as written in the
    torchvision reference, and channels_last like the engine. Alternated ``rounds`` times (the
    machine may be shared), each figure the second epoch of its run; medians reported; the ratio
    is against the faster plain loop."""
    config = recipe_config(store, uri, "throughput", [*MODES["frozen"], "epochs=2", *sets])
    pre = Preprocessing.for_config(config)
    hw = setup_hardware("cpu")
    rates: dict[str, list[float]] = {"engine": [], "plain": [], "plain_channels_last": []}
    formats = {"plain": torch.contiguous_format, "plain_channels_last": torch.channels_last}
    for _ in range(rounds):
        data = open_datasets(config, store, hw, train_transform(pre, config.augmentation),
                             eval_transform(pre))  # fmt: skip
        model = _frozen_model(config, store)
        result = fit(model, data, config, hw, freeze=model.spec.default_freeze)
        rates["engine"].append(result.history[-1]["images_per_second"])
        for name, memory_format in formats.items():
            rates[name].append(_plain_epochs(config, store, data.train, 2, memory_format)[-1])
        print(json.dumps({k: v[-1] for k, v in rates.items()}), flush=True)
    row = {f"{k}_images_per_second": float(np.median(v)) for k, v in rates.items()}
    row["rounds"] = rounds
    best_plain = max(row["plain_images_per_second"], row["plain_channels_last_images_per_second"])
    row["ratio"] = row["engine_images_per_second"] / best_plain
    return row


def _frozen_model(config: TrainConfig, store: ObjectStore) -> FineTuneModel:
    torch.manual_seed(0)
    model, _ = build_model(config, store, CLASSES, BackboneRegistry())
    return model


def _plain_epochs(
    config: TrainConfig,
    store: ObjectStore,
    dataset,
    epochs: int,
    memory_format: torch.memory_format,
) -> list[float]:
    tensors = list(dataset)  # decoded and augmented once, kept in memory
    images = torch.stack([t for t, _ in tensors])
    labels = torch.tensor([label for _, label in tensors])
    model = _frozen_model(config, store)
    model.freeze(model.spec.default_freeze)
    model.to(memory_format=memory_format)
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
            loss = criterion(model(x.contiguous(memory_format=memory_format)), y)
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
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch default")
    parser.add_argument("--val-per-class", type=int, default=None,
                        help="validation images per class (default: VAL_PER_CLASS)")  # fmt: skip
    parser.add_argument("--test-limit", type=int, default=None, help="fewer test images (dev)")
    parser.add_argument("--throughput-rounds", type=int, default=3, help="0: skip")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="TrainConfig override, e.g. lr=3e-3 augmentation.rotation=10",
    )  # fmt: skip
    parser.add_argument("--flip-tta", action="store_true", help="also score with flip TTA")
    parser.add_argument("--compare-runtimes", action="store_true",
                        help="also score the weights as TorchScript and as fp32 ONNX")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    if args.threads:
        # On a shared, oversubscribed CPU, OpenMP threads spin against each other; 1 can be faster.
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        stores = open_store(args.store, Path(tmp))
        try:
            t0 = time.perf_counter()
            val = {n: args.val_per_class or val_per_class(n) for n in args.shots}
            uris = prepare(stores.store, val, args.test_limit)
            print(f"# store: {stores.kind}; upload {time.perf_counter() - t0:.0f} s", flush=True)
            rows = [
                run(stores.store, uris, shots, mode, args.set, args.flip_tta, args.compare_runtimes)
                for shots in args.shots
                for mode in args.modes
            ]
            if args.throughput_rounds and 100 in args.shots:
                rows.append(throughput(uris["100"], stores.store, args.throughput_rounds, args.set))
                print(json.dumps(rows[-1]), flush=True)
        finally:
            stores.close()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
