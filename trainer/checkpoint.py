"""Training checkpoints and model weights in the object store.

- ``CheckpointStore``: one object per run, ``checkpoints/<run id>/last.pt``, rewritten each epoch
  (a single PUT is atomic in S3/MinIO and in FileStore): model, optimizer, scheduler, epoch, best
  model so far, history, data position.
- ``weights_key``: a plain state_dict stored next to each archive,
  ``weights/<model>/<digest>.pt``,
  so a published version can be the starting point of a later run.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import torch

from refit.registry import check_model_name
from refit.storage import ObjectStore


def to_bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def from_bytes(data: bytes) -> dict:
    # weights_only: a checkpoint holds tensors and plain containers, never code.
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


@dataclass(frozen=True)
class CheckpointStore:
    store: ObjectStore
    bucket: str
    run_id: str

    @property
    def key(self) -> str:
        return f"checkpoints/{self.run_id}/last.pt"

    def save(self, state: dict) -> None:
        self.store.put(self.bucket, self.key, to_bytes(state))

    def delete(self) -> None:
        """After the run is published its checkpoint has no use left."""
        self.store.delete(self.bucket, self.key)

    def load(self) -> dict | None:
        if self.store.stat(self.bucket, self.key) is None:
            return None
        return from_bytes(self.store.get(self.bucket, self.key))


def weights_key(model: str, digest: str) -> str:
    return f"weights/{check_model_name(model)}/{digest}.pt"


def save_weights(
    store: ObjectStore,
    bucket: str,
    key: str,
    *,
    backbone: str,
    class_names: list[str],
    state_dict: dict,
) -> None:
    payload = {"backbone": backbone, "class_names": class_names, "state_dict": state_dict}
    store.put(bucket, key, to_bytes(payload))


def load_weights(store: ObjectStore, bucket: str, key: str) -> dict:
    return from_bytes(store.get(bucket, key))
