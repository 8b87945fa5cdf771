"""A published version's plain weights, ``weights/<model>/<digest>.pt`` beside its archive
(same digest): a state_dict with its backbone and class names, so the version can be the
starting point of a later run and the promotion gate can evaluate it."""

from __future__ import annotations

import io

import torch

from refit.registry import check_model_name
from refit.storage import ObjectStore


def to_bytes(obj: object) -> bytes:
    """torch.save's bytes (checkpoints use the same format)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def from_bytes(data: bytes) -> dict:
    # weights_only: weights and checkpoints hold tensors and plain containers, never code.
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


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
