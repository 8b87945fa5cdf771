"""Who reads what: the per-epoch order, split across ranks and then DataLoader workers.

Every (rank, worker) pair gets a disjoint slice of one seeded permutation, so across all of them
each item is read exactly once per epoch. Workers take whole blocks of ``block`` items in turn;
with ``block`` = the DataLoader's batch size, the DataLoader (which takes batches from workers
round-robin) hands the training loop this rank's items in permutation order, whatever the number
of workers. That is what makes resumption exact (see ``progress.py``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Consumer:
    rank: int
    world_size: int
    worker: int
    num_workers: int

    @property
    def seed_key(self) -> str:
        return f"{self.rank}/{self.world_size}/{self.worker}/{self.num_workers}"


def resolve_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values win; otherwise torch.distributed's, when a process group is up."""
    if (rank is None) != (world_size is None):
        raise ValueError("pass both rank and world_size, or neither")
    if rank is None or world_size is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")
    return rank, world_size


def current_consumer(rank: int, world_size: int) -> Consumer:
    from torch.utils.data import get_worker_info

    info = get_worker_info()
    if info is None:
        return Consumer(rank, world_size, 0, 1)
    return Consumer(rank, world_size, info.id, info.num_workers)


def epoch_order(items: Sequence[T], *, seed: int, epoch: int, shuffle: bool) -> list[T]:
    """The same permutation on every rank and worker for a given (seed, epoch)."""
    ordered = list(items)
    if shuffle:
        random.Random(f"refit-epoch:{seed}:{epoch}").shuffle(ordered)
    return ordered


def for_rank(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    return list(items[rank::world_size])


def for_worker(items: Sequence[T], worker: int, num_workers: int, block: int = 1) -> list[T]:
    """Blocks of ``block`` consecutive items, dealt to workers in turn."""
    return [
        item
        for start in range(worker * block, len(items), num_workers * block)
        for item in items[start : start + block]
    ]


def consumed_by_worker(consumed: int, worker: int, num_workers: int, block: int) -> int:
    """How many of ``consumed`` rank-level items came from ``worker``, when the DataLoader
    takes blocks of ``block`` items from workers round-robin."""
    full_blocks, partial = divmod(consumed, block)
    count = len(range(worker, full_blocks, num_workers)) * block
    return count + (partial if full_blocks % num_workers == worker else 0)
