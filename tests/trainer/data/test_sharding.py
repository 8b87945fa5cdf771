from __future__ import annotations

import pytest

from trainer.data.sharding import (
    consumed_by_worker,
    epoch_order,
    for_rank,
    for_worker,
    resolve_world,
)


def test_epoch_order_is_seeded_per_epoch() -> None:
    items = list(range(100))
    assert epoch_order(items, seed=1, epoch=0, shuffle=True) == epoch_order(
        items, seed=1, epoch=0, shuffle=True
    )
    assert epoch_order(items, seed=1, epoch=0, shuffle=True) != epoch_order(
        items, seed=1, epoch=1, shuffle=True
    )
    assert epoch_order(items, seed=1, epoch=0, shuffle=True) != epoch_order(
        items, seed=2, epoch=0, shuffle=True
    )
    assert epoch_order(items, seed=1, epoch=5, shuffle=False) == items


@pytest.mark.parametrize(
    "world_size,num_workers,block", [(1, 1, 1), (2, 2, 3), (3, 4, 2), (4, 3, 5)]
)
def test_ranks_and_workers_partition_the_items(
    world_size: int, num_workers: int, block: int
) -> None:
    items = list(range(101))
    parts = [
        for_worker(for_rank(items, rank, world_size), worker, num_workers, block)
        for rank in range(world_size)
        for worker in range(num_workers)
    ]
    assert sorted(i for part in parts for i in part) == items


def test_round_robin_blocks_restore_rank_order() -> None:
    """What a DataLoader does with batch_size=block: one batch from each worker in turn."""
    rank_items, num_workers, block = list(range(23)), 3, 4
    streams = [for_worker(rank_items, w, num_workers, block) for w in range(num_workers)]
    batches = [[s[i : i + block] for i in range(0, len(s), block)] for s in streams]
    merged = [
        x
        for n in range(10)
        for w in range(num_workers)
        if n < len(batches[w])
        for x in batches[w][n]
    ]
    assert merged == rank_items


@pytest.mark.parametrize("consumed", [0, 1, 4, 7, 12, 13, 24])
def test_consumed_by_worker_splits_a_rank_count(consumed: int) -> None:
    num_workers, block = 3, 4
    counts = [consumed_by_worker(consumed, w, num_workers, block) for w in range(num_workers)]
    assert sum(counts) == consumed
    streams = [for_worker(list(range(100)), w, num_workers, block) for w in range(num_workers)]
    taken = sorted(x for w in range(num_workers) for x in streams[w][: counts[w]])
    assert taken == list(range(consumed))


def test_resolve_world() -> None:
    assert resolve_world(None, None) == (0, 1)
    assert resolve_world(1, 2) == (1, 2)
    with pytest.raises(ValueError, match="both"):
        resolve_world(1, None)
    with pytest.raises(ValueError, match="out of range"):
        resolve_world(2, 2)
