"""CPU cost of one epoch's data work in the training process (DataLoader workers=0), where on a
small CPU host it competes with the training step for the same cores.

Reads N generated 28x28 grayscale PNGs from the embedded FileStore through the per-object
dataset with the fine-tuning transform (random resized crop to --size px + flip), and times:

    handed over 1 at a time   every fetch+decode is its own thread task (the old way)
    handed over K at a time   trainer.data.objects.FETCHES_PER_TASK (the shipped way), and any
                              other K given with --per-task
    no threads                fetch, decode and transform in sequence (the floor on local disk)
    transform only            the transform alone on already-decoded images

    PYTHONPATH=. .venv/bin/python bench/epoch_data_cost.py --images 1000 --rounds 5 \
        [--per-task 1 4 8 16]
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from refit.storage import FileStore
from trainer.config import Augmentation
from trainer.data import objects, open_dataset
from trainer.data.decode import DecodeOptions, decode_image
from trainer.preprocessing import Preprocessing
from trainer.transforms import train_transform


def upload(store: FileStore, images: int) -> str:
    rng = np.random.default_rng(0)
    store.ensure_bucket("bench")
    for i in range(images):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L").save(buffer, "PNG")
        store.put("bench", f"ds/train/class{i % 10}/{i:05d}.png", buffer.getvalue())
    return "s3://bench/ds"


def sequential(fn: Callable, items: list, in_flight: int, per_task: int = 1) -> Iterator:
    """Stands in for prefetch: no threads at all."""
    return ((item, fn(item)) for item in items)


def timed(epoch: Callable[[], int], rounds: int) -> float:
    """Median milliseconds of CPU per image."""
    costs = []
    for _ in range(rounds):
        started = time.process_time()
        count = epoch()
        costs.append((time.process_time() - started) * 1000 / count)
    return statistics.median(costs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=5)
    shipped = objects.FETCHES_PER_TASK
    parser.add_argument(
        "--per-task", type=int, nargs="+", default=[1, shipped],
        help="fetches per thread task to compare (the first is the baseline)",
    )  # fmt: skip
    args = parser.parse_args()
    pre = Preprocessing(resize_size=args.size, crop_size=args.size)
    transform = train_transform(pre, Augmentation(crop_scale=(0.85, 1.0), hflip=0.5))
    with tempfile.TemporaryDirectory() as tmp:
        store = FileStore(Path(tmp))
        uri = upload(store, args.images)
        dataset = open_dataset(uri, store=store, transform=transform, val_fraction=0.0)

        def epoch() -> int:
            return sum(1 for _ in dataset)

        results = {}
        for per_task in args.per_task:
            objects.FETCHES_PER_TASK = per_task
            results[f"handed over {per_task} at a time"] = timed(epoch, args.rounds)
        objects.FETCHES_PER_TASK = shipped
        objects.prefetch, threaded = sequential, objects.prefetch
        results["no threads"] = timed(epoch, args.rounds)
        objects.prefetch = threaded
        keys = [sample.key for sample in dataset.samples]
        decoded = [decode_image(store.get("bench", key), DecodeOptions()) for key in keys]
        results["transform only"] = timed(lambda: len([transform(i) for i in decoded]), args.rounds)
    print(f"{args.images} images, {args.size} px, torch threads={torch.get_num_threads()}, "
          f"median of {args.rounds} epochs, CPU ms per image:")  # fmt: skip
    for name, cost in results.items():
        print(f"  {name:28s} {cost:6.3f}")
    first = results[f"handed over {args.per_task[0]} at a time"]
    if shipped in args.per_task:
        shipped_cost = results[f"handed over {shipped} at a time"]
        print(f"  {args.per_task[0]} per task / shipped ({shipped}): {first / shipped_cost:.2f}x")


if __name__ == "__main__":
    main()
