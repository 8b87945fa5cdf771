from __future__ import annotations

import pytest

from trainer.data.errors import ResumeMismatch
from trainer.data.progress import Progress


def progress() -> Progress:
    return Progress(digest="d" * 64, seed=3, world_size=2)


def test_advance_and_state_roundtrip() -> None:
    p = progress()
    p.set_epoch(4)
    p.advance(32)
    p.advance(16)
    state = p.state_dict()
    assert state | {} == {
        "version": 1,
        "epoch": 4,
        "samples_seen": 48,
        "seed": 3,
        "world_size": 2,
        "digest": "d" * 64,
    }
    resumed = progress()
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.samples_seen, resumed.skip) == (4, 48, 48)
    resumed.set_epoch(4)  # same epoch: the skip stays
    assert resumed.skip == 48
    resumed.advance(8)
    assert resumed.state_dict()["samples_seen"] == 56
    resumed.set_epoch(5)  # next epoch starts from its beginning
    assert (resumed.samples_seen, resumed.skip) == (0, 0)


@pytest.mark.parametrize(
    "field,value", [("digest", "e" * 64), ("seed", 4), ("world_size", 4), ("version", 99)]
)
def test_state_from_another_dataset_is_refused(field: str, value: object) -> None:
    state = progress().state_dict() | {field: value}
    with pytest.raises(ResumeMismatch, match=field):
        progress().load_state_dict(state)


def test_advance_rejects_negative() -> None:
    with pytest.raises(ValueError):
        progress().advance(-1)
