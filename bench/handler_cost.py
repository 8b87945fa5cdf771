"""What the serving handler costs a TorchServe worker: memory, start time, preprocessing time.

The handler (trainer/serving/handler.py) preprocesses with torch alone. The naive way is what it
did before, torchvision's transforms.v2; here that is the same handler with torchvision imported
(its import is the memory and start cost) and training's ``eval_transform`` (torchvision's v2
pipeline, the one the handler must match to the bit) for the preprocessing time.

1. Preprocessing, in this process, one thread: microseconds per image for three photos at the
   default 224 px crop and at 96 px (a small-image recipe), both pipelines, checked equal.
2. Workers: one TorchServe; ``--workers`` versions of imagenet v1's archive (EfficientNet-Lite0)
   registered with a worker each, then unregistered, for each handler in turn, ``--rounds``
   times. Per worker: the RSS and PSS the TorchServe process tree gained (psutil), and the time
   a synchronous registration took (starting the worker, importing, loading the model).

Usage: PYTHONPATH=. .venv/bin/python bench/handler_cost.py [--workers 4] [--rounds 2]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
import timeit
import zipfile
from dataclasses import asdict

import psutil
import torch
from memory import torchserve_alone, tree_memory
from PIL import Image
from skimage import data

from refit.registry import VersionRecord
from refit.storage import ObjectStore
from refit.torchserve import TorchServeClient
from trainer.preprocessing import Preprocessing
from trainer.serving.handler import transform_for
from trainer.transforms import eval_transform

MiB = 1 << 20
PHOTOS = {"coffee": data.coffee, "chelsea": data.chelsea, "astronaut": data.astronaut}
FUTURE = b"from __future__ import annotations\n"
NAIVE_IMPORT = b"import torchvision.transforms.v2  # the naive way: what the handler imported\n"


def preprocessing() -> None:
    torch.set_num_threads(1)
    print("preprocessing, us per image (best of 5 x 200), one thread")
    print(f"{'photo':10s} {'crop':>4s} {'torchvision v2':>15s} {'handler':>8s} {'ratio':>6s}")
    for name, load in PHOTOS.items():
        image = Image.fromarray(load()).convert("RGB")
        for pre in (Preprocessing(), Preprocessing(resize_size=96, crop_size=96)):
            naive, served = eval_transform(pre), transform_for(asdict(pre))
            assert torch.equal(naive(image), served(image)), name
            times = [
                min(timeit.repeat(lambda f=f, i=image: f(i), number=200, repeat=5)) / 200 * 1e6
                for f in (naive, served)
            ]
            print(f"{name:10s} {pre.crop_size:4d} {times[0]:15.0f} {times[1]:8.0f} "
                  f"{times[0] / times[1]:5.1f}x")  # fmt: skip


def with_naive_import(archive: bytes) -> bytes:
    """The same .mar, its handler importing torchvision first."""
    target = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(archive)) as old, zipfile.ZipFile(target, "w") as new:
        for item in old.infolist():
            content = old.read(item)
            if item.filename == "handler.py":  # after the __future__ import, which comes first
                content = content.replace(FUTURE, FUTURE + NAIVE_IMPORT, 1)
            new.writestr(item, content)
    return target.getvalue()


def naive_records(store: ObjectStore, records: list[VersionRecord]) -> list[VersionRecord]:
    """A second model whose versions hold the naive handler's archives."""
    naive = []
    for record in records:
        archive = with_naive_import(store.get("refit", record.archive_key))
        key = f"archives/naive/{record.version}.mar"
        store.put("refit", key, archive)
        naive.append(VersionRecord("naive", record.version, key, record.class_names))
    return naive


def load(client: TorchServeClient, store: ObjectStore, records: list[VersionRecord]) -> dict:
    """Register ``records`` with a worker each; what the process tree gained, per worker."""
    before = tree_memory(psutil.Process())
    seconds = []
    for record in records:
        start = time.perf_counter()
        client.register(record.model, record.version, store.url("refit", record.archive_key))
        seconds.append(time.perf_counter() - start)
    time.sleep(2)
    after = tree_memory(psutil.Process())
    for record in reversed(records):  # TorchServe unloads a model's default (v1) last
        client.unregister(record.model, record.version)
    time.sleep(3)  # the workers exit
    n = len(records)
    return {
        "rss": (after[1] - before[1]) / n / MiB,
        "pss": (after[2] - before[2]) / n / MiB,
        "start": statistics.median(seconds),
    }


def workers(count: int, rounds: int) -> None:
    with torchserve_alone("refit-handler-", count) as (store, client, shipped):
        paths = {"shipped handler": shipped, "naive (imports torchvision)": naive_records(
            store, shipped)}  # fmt: skip
        print(f"\nworkers: {count} versions with a worker each, per worker")
        print(f"{'round':>5s}  {'handler':28s} {'RSS MiB':>8s} {'PSS MiB':>8s} {'start s':>8s}")
        for round_ in range(1, rounds + 1):
            for name, records in paths.items():
                got = load(client, store, records)
                print(f"{round_:5d}  {name:28s} {got['rss']:8.0f} {got['pss']:8.0f} "
                      f"{got['start']:8.1f}", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    preprocessing()
    workers(args.workers, args.rounds)


if __name__ == "__main__":
    main()
