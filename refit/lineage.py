"""Where a model version came from: its backbone, starting point, dataset, settings and job.

One type for the trainer that writes it, the registry that stores it (inside each version
record's JSON) and the service and CLI that show it. Torch-free.

Stored form: a JSON object with the fields below; a field at its default is left out, so a
version published before a field existed and one that never had it read the same. Keys this code
does not know (written by a newer refit) are kept in ``extra`` and written back unchanged, so a
record never loses what another version of refit put there, and garbage collection, which keeps
every key any lineage mentions, still sees them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class Parent:
    """The published version a run continued from."""

    model: str
    version: str
    weights_key: str


@dataclass(frozen=True)
class Lineage:
    backbone: str = ""
    start: str = ""  # "imagenet", "random" or the parent's "MODEL:VERSION"
    parent: Parent | None = None
    frozen_depth: int | None = None
    dataset_uri: str = ""
    dataset_objects: int = 0  # images in the whole dataset, both splits
    dataset_digest: str = ""
    weights_key: str = ""  # plain weights beside the archive: a later run may start from them
    run_id: str = ""
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    base_version: str = ""  # the Retrain request's base_version
    created_by: str = ""
    job_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # keys written by a newer refit

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        for f in _FIELDS:
            value = getattr(self, f.name)
            if value != _default(f.name):
                out[f.name] = _parent_dict(value) if f.name == "parent" else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Lineage:
        known = {f.name for f in _FIELDS}
        values = {name: data[name] for name in known if name in data}
        if values.get("parent") is not None:
            values["parent"] = Parent(**values["parent"])
        for name in ("dataset_objects", "frozen_depth"):
            if values.get(name) is not None:
                values[name] = int(values[name])
        for name in ("base_version", "job_id", "created_by"):
            if name in values:
                values[name] = str(values[name])
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(**values, extra=extra)

    def strings(self) -> Iterator[str]:
        """Every string anywhere in the stored form (object keys a record keeps alive)."""
        yield from _strings(self.to_dict())


_FIELDS = tuple(f for f in fields(Lineage) if f.name != "extra")
_DEFAULTS = Lineage()


def _default(name: str) -> Any:
    return getattr(_DEFAULTS, name)


def _parent_dict(parent: Parent) -> dict[str, str]:
    return {"model": parent.model, "version": parent.version, "weights_key": parent.weights_key}


def _strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)
