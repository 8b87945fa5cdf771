"""A run's checkpoint: the stored layout stays the one earlier versions wrote, so they resume."""

from __future__ import annotations

import torch

from refit.storage import FileStore
from trainer.checkpoint import CheckpointStore
from trainer.weights import to_bytes

EVAL = {"loss": 0.4, "accuracy": 0.75, "per_class_accuracy": [0.5, 1.0],
        "confusion": [[1, 1], [0, 2]], "images": 4}  # fmt: skip
WRITTEN_BEFORE = {  # as trainer/train.py wrote it at the end of epoch 2, before the split
    "epoch": 2,
    "phase": 1,
    "model": {"w": torch.ones(2)},
    "optimizer": {"state": {}, "param_groups": []},
    "scheduler": {"last_epoch": 9},
    "data": {"version": 1, "epoch": 2, "samples_seen": 40},
    "best": {
        "epoch": 1,
        "accuracy": 0.75,
        "top_accuracy": 0.8,
        "state": {"w": torch.zeros(2)},
        "eval": EVAL,
    },
    "bad_epochs": 1,
    "stopped_early": False,
    "history": [{"epoch": 0}, {"epoch": 1}, {"epoch": 2}],
}


def test_an_earlier_checkpoint_loads_and_is_saved_back_in_the_same_layout(
    file_store: FileStore,
) -> None:
    file_store.ensure_bucket("refit")
    checkpoints = CheckpointStore(file_store, "refit", "run-1")
    file_store.put("refit", checkpoints.key, to_bytes(WRITTEN_BEFORE))
    loaded = checkpoints.load()
    assert loaded.state.next_epoch == 3 and loaded.phase == 1
    assert loaded.state.selection.epoch == 1 and loaded.state.selection.top_accuracy == 0.8
    assert loaded.state.selection.evaluation.per_class_accuracy == [0.5, 1.0]
    assert loaded.data["samples_seen"] == 40 and len(loaded.state.history) == 3
    again = loaded.to_dict()
    assert again.keys() == WRITTEN_BEFORE.keys() and again["best"]["eval"] == EVAL
    assert torch.equal(again["best"]["state"]["w"], torch.zeros(2))
    assert {k: v for k, v in again.items() if k not in ("model", "best")} == {
        k: v for k, v in WRITTEN_BEFORE.items() if k not in ("model", "best")
    }
