"""The pack index: ``PREFIX/refit-index.json`` next to WebDataset tar shards.

Shards hold ``<key>.<ext>`` (the image bytes as uploaded) and ``<key>.cls`` (the label as decimal
text), so any WebDataset reader can use them; the index adds what such readers don't know: class
names, per-shard counts, how the split was made and the digest of the source listing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from trainer.data.errors import PackFormatError

INDEX_NAME = "refit-index.json"
FORMAT = "refit-webdataset/1"


@dataclass(frozen=True)
class ShardInfo:
    key: str  # relative to the pack prefix
    count: int
    size: int


@dataclass(frozen=True)
class PackIndex:
    class_names: tuple[str, ...]
    splits: dict[str, tuple[ShardInfo, ...]]
    class_counts: dict[str, tuple[int, ...]]  # split -> images per class
    split_mode: str
    val_fraction: float
    source: str
    source_digest: str
    format: str = FORMAT

    def count(self, split: str) -> int:
        return sum(shard.count for shard in self.splits.get(split, ()))

    @property
    def num_objects(self) -> int:
        return sum(self.count(split) for split in self.splits)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> PackIndex:
        try:
            raw = json.loads(data)
            if raw.get("format") != FORMAT:
                raise PackFormatError(f"{where}: format {raw.get('format')!r}, expected {FORMAT!r}")
            return cls(
                class_names=tuple(raw["class_names"]),
                splits={
                    split: tuple(ShardInfo(**shard) for shard in shards)
                    for split, shards in raw["splits"].items()
                },
                class_counts={split: tuple(c) for split, c in raw["class_counts"].items()},
                split_mode=raw["split_mode"],
                val_fraction=float(raw["val_fraction"]),
                source=raw["source"],
                source_digest=raw["source_digest"],
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PackFormatError(f"{where} is not a valid pack index: {exc}") from exc
