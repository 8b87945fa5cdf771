"""Training throughput with 1 and 2 processes (DDP over gloo on CPU), side by side (not a test).

The same fine-tuning run three ways, interleaved over --rounds so machine load hits all alike:
- ``in-process``: ``train_and_package`` in this process (a job with 1 process per job), with
  torch's default threads (one per core), and again with 1 thread (what each of two ranks gets);
- ``torchrun x1``: the multi-process path with one rank (what 1 process per job would cost if
  every job went through torchrun);
- ``torchrun x2``: two ranks, each with half the cores (OMP_NUM_THREADS = cores / 2).
Reports the job's training images/s (every rank's images over the training time) and the wall
time from the call to the stored archive (process start-up, imports, rendezvous, packaging
included). Synthetic colour images in an embedded FileStore, EfficientNet-Lite0, default freeze.

    PYTHONPATH=. .venv/bin/python bench/train_processes.py --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

import torch

from refit.storage import StorageSettings
from tests.trainer.synthetic import upload_colours
from trainer.config import TrainConfig
from trainer.jobs.processes import Launch, train_in_processes
from trainer.train import train_and_package

MODES = ("in-process", "in-process 1 thread", "torchrun x1", "torchrun x2")


def run(mode: str, config: TrainConfig, storage: StorageSettings) -> dict:
    config = replace(config, run_id=f"bench-{uuid.uuid4().hex[:8]}")
    started = time.perf_counter()
    if mode.startswith("in-process"):
        threads = torch.get_num_threads()
        torch.set_num_threads(1 if mode.endswith("1 thread") else threads)
        try:
            result = train_and_package(config, storage.open())
        finally:
            torch.set_num_threads(threads)
    else:
        result = train_in_processes(config, Launch(int(mode[-1])), storage)
    wall = time.perf_counter() - started
    return {
        "images_per_second": result.metrics["images_per_second"],
        "train_seconds": result.metrics["train_seconds"],
        "wall_seconds": wall,
        "val_accuracy": result.metrics["val_accuracy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--per-class", type=int, default=64, help="training images per class")
    parser.add_argument("--size", type=int, default=96, help="crop size in pixels")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16, help="per process")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        storage = StorageSettings(data_dir=Path(tmp))
        uri = upload_colours(
            storage.open(), "data", "colours", train=args.per_class,
            val=max(args.per_class // 4, 1), size=args.size,
        )  # fmt: skip
        config = TrainConfig(
            dataset=uri, out="bench", epochs=args.epochs, batch_size=args.batch_size,
            crop_size=args.size, workers=0, device="cpu", resume=False, version="1",
        )  # fmt: skip
        runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for round_ in range(args.rounds):
            for mode in MODES:
                runs[mode].append(run(mode, config, storage))
                print(f"round {round_ + 1} {mode}: {json.dumps(runs[mode][-1])}", flush=True)
    base = statistics.median(r["images_per_second"] for r in runs["in-process"])
    print(f"\n{'mode':<20} {'train img/s':>11} {'x in-process':>12} {'wall s':>7}")
    for mode, results in runs.items():
        rate = statistics.median(r["images_per_second"] for r in results)
        wall = statistics.median(r["wall_seconds"] for r in results)
        print(f"{mode:<20} {rate:>11.1f} {rate / base:>12.2f} {wall:>7.1f}")


if __name__ == "__main__":
    main()
