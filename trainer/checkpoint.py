"""A run's training checkpoint in the object store.

- ``CheckpointStore``: one object per run, ``checkpoints/<run id>/last.pt``, rewritten at each
  epoch's end and, in a long epoch, every ``checkpoint_interval_s`` (a single PUT is atomic in
  S3/MinIO and in FileStore). A ``Checkpoint`` holds the model, optimizer, scheduler, phase, the
  data position (epoch and images consumed, so a resumed run skips exactly those) and the
  ``TrainingState``: epochs done, the kept epoch so far, early stopping and history.

A published version's plain weights are another object (trainer/weights.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from refit.storage import ObjectStore
from trainer.engine import EvalResult
from trainer.selection import EpochSelection
from trainer.weights import from_bytes, to_bytes


@dataclass
class TrainingState:
    """Where a run stands between batches."""

    next_epoch: int = 0  # the first epoch not completed
    selection: EpochSelection = field(default_factory=EpochSelection)
    stopped_early: bool = False
    history: list[dict] = field(default_factory=list)  # one entry per completed epoch


@dataclass(frozen=True)
class Checkpoint:
    state: TrainingState
    phase: int
    model: dict
    optimizer: dict
    scheduler: dict
    data: dict  # the training dataset's state_dict: its epoch and images consumed
    ema: dict | None = None  # the weight average's state_dict, when the run keeps one

    def to_dict(self) -> dict:
        """The stored layout (unchanged since epoch-end checkpoints, so old ones resume)."""
        selection = self.state.selection
        evaluation = selection.evaluation
        return {
            "epoch": self.state.next_epoch - 1,
            "phase": self.phase,
            "model": self.model,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "data": self.data,
            "best": {
                "epoch": selection.epoch,
                "accuracy": selection.accuracy,
                "top_accuracy": selection.top_accuracy,
                "state": selection.state,
                "eval": asdict(evaluation) if evaluation is not None else None,
            },
            "bad_epochs": selection.bad_epochs,
            "stopped_early": self.state.stopped_early,
            "history": self.state.history,
        } | ({"ema": self.ema} if self.ema is not None else {})

    @classmethod
    def from_dict(cls, saved: dict) -> Checkpoint:
        best = saved["best"]
        selection = EpochSelection(
            epoch=best["epoch"],
            accuracy=best["accuracy"],
            top_accuracy=best["top_accuracy"],
            state=best["state"],
            evaluation=EvalResult(**best["eval"]) if best["eval"] is not None else None,
            bad_epochs=saved["bad_epochs"],
        )
        state = TrainingState(
            next_epoch=saved["epoch"] + 1,
            selection=selection,
            stopped_early=saved["stopped_early"],
            history=list(saved["history"]),
        )
        return cls(state, saved["phase"], saved["model"], saved["optimizer"],
                   saved["scheduler"], saved["data"], saved.get("ema"))  # fmt: skip


@dataclass(frozen=True)
class CheckpointStore:
    store: ObjectStore
    bucket: str
    run_id: str

    @property
    def key(self) -> str:
        return f"checkpoints/{self.run_id}/last.pt"

    def save(self, checkpoint: Checkpoint) -> None:
        self.store.put(self.bucket, self.key, to_bytes(checkpoint.to_dict()))

    def delete(self) -> None:
        """After the run is published its checkpoint has no use left."""
        self.store.delete(self.bucket, self.key)

    def load(self) -> Checkpoint | None:
        if self.store.stat(self.bucket, self.key) is None:
            return None
        return Checkpoint.from_dict(from_bytes(self.store.get(self.bucket, self.key)))
