"""The two datasets a run reads (train and val) and their DataLoaders."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from torch.utils.data import DataLoader

from refit.storage import ObjectStore
from trainer.config import TrainConfig
from trainer.hardware import Hardware, loader_workers
from trainer.transforms import Transform


class StreamingDataset(Protocol):
    """What the loop needs from a dataset (trainer.data.open_dataset returns one)."""

    class_names: list[str]
    num_samples: int  # this split, all ranks
    num_objects: int
    digest: str

    def __iter__(self) -> Iterable: ...
    def set_epoch(self, epoch: int) -> None: ...
    def advance(self, n: int) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True)
class Datasets:
    train: StreamingDataset
    val: StreamingDataset


DatasetOpener = Callable[[TrainConfig, ObjectStore, Hardware, Transform, Transform], Datasets]


def open_datasets(
    config: TrainConfig, store: ObjectStore, hw: Hardware, train_tf: Transform, eval_tf: Transform
) -> Datasets:
    from trainer.data import ReadOptions, open_dataset

    common = {
        "options": ReadOptions(batch_size=config.batch_size),  # exact resume across workers
        "store": store,
        "val_fraction": config.val_fraction,
        "seed": config.seed,
        "rank": hw.rank,
        "world_size": hw.world_size,
    }
    return Datasets(
        train=open_dataset(
            config.dataset, split="train", transform=train_tf, shuffle=True, **common
        ),
        val=open_dataset(config.dataset, split="val", transform=eval_tf, shuffle=False, **common),
    )


@dataclass(frozen=True)
class Loaders:
    train: DataLoader
    val: DataLoader

    @classmethod
    def for_datasets(cls, data: Datasets, config: TrainConfig, hw: Hardware) -> Loaders:
        return cls(make_loader(data.train, config, hw), make_loader(data.val, config, hw))


def make_loader(dataset: StreamingDataset, config: TrainConfig, hw: Hardware) -> DataLoader:
    workers = loader_workers(hw, config.workers)
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        num_workers=workers,
        pin_memory=hw.pin_memory,
        persistent_workers=False,  # set_epoch must reach the workers each epoch
        prefetch_factor=4 if workers else None,
    )


def steps_per_epoch(dataset: StreamingDataset, batch_size: int, hw: Hardware) -> int:
    per_rank = math.ceil(dataset.num_samples / hw.world_size)
    return max(math.ceil(per_rank / batch_size), 1)
