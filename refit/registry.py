"""Model registry: versions, defaults, metrics and lineage, stored as JSON in the object store.

Layout in the refit bucket:
    registry/<model>/versions/<version>.json   one record per published version (immutable)
    registry/<model>/default.json             {"version": "..."}
    archives/<model>/<sha256>.mar             the archive each record points to
The object store is the source of truth; TorchServe is reconciled from it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from refit.errors import NotFound, RefitError
from refit.identifiers import check_model_name, check_version
from refit.lineage import Lineage
from refit.storage import ObjectStore

DEFAULT_BATCH_SIZE = 8
# With ONNX Runtime in the worker, a 2 ms wait fills batches as well as 5 ms did at concurrency 8
# and costs a lone request 5 ms less (bench/batching.py, docs/benchmarks.md *Dynamic batching*).
DEFAULT_MAX_BATCH_DELAY_MS = 2
MAX_BATCH_SIZE = 256
MAX_BATCH_DELAY_MS = 1000


class RegistryError(RefitError):
    """Base class of registry errors."""


class ModelNotFound(RegistryError, NotFound):
    pass


@dataclass(frozen=True)
class Batching:
    """How TorchServe batches a version's Predicts (docs/benchmarks.md chose the defaults).

    TorchServe's worker takes up to ``batch_size`` queued requests at once; after the first it
    waits at most ``max_batch_delay_ms`` for the rest, so a lone request pays that delay.
    """

    batch_size: int = DEFAULT_BATCH_SIZE
    max_batch_delay_ms: int = DEFAULT_MAX_BATCH_DELAY_MS

    def __post_init__(self) -> None:
        if not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise ValueError(f"batch_size must be 1-{MAX_BATCH_SIZE}, got {self.batch_size}")
        # 1 ms at least: TorchServe's gRPC API reads 0 as "unset" and waits its default 100 ms.
        if not 1 <= self.max_batch_delay_ms <= MAX_BATCH_DELAY_MS:
            raise ValueError(
                f"max_batch_delay_ms must be 1-{MAX_BATCH_DELAY_MS}, got {self.max_batch_delay_ms}"
            )


@dataclass(frozen=True)
class VersionRecord:
    model: str
    version: str
    archive_key: str
    class_names: list[str]
    metrics: dict[str, float] = field(default_factory=dict)
    lineage: Lineage = field(default_factory=Lineage)
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    # Records written before batching existed get today's defaults at their next registration.
    batching: Batching = field(default_factory=Batching)
    # What TorchServe serves (trainer/precision.py): records written before precisions were
    # chosen are fp32 (TorchScript). Accuracies on the validation split; None: not measured.
    precision: str = "fp32"
    fp32_accuracy: float | None = None
    int8_accuracy: float | None = None

    def to_json(self) -> bytes:
        return json.dumps({**asdict(self), "lineage": self.lineage.to_dict()}, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> VersionRecord:
        fields = json.loads(data)
        fields["batching"] = Batching(**fields.get("batching", {}))
        fields["lineage"] = Lineage.from_dict(fields.get("lineage", {}))
        return cls(**fields)


class Registry:
    def __init__(self, store: ObjectStore, bucket: str) -> None:
        self.store = store
        self.bucket = bucket

    def listing(self) -> tuple[tuple[str, str], ...]:
        """Every registry object's (key, etag): it changes whenever a record or default does."""
        return tuple((info.key, info.etag) for info in self.store.list(self.bucket, "registry/"))

    def models(self, listing: tuple[tuple[str, str], ...] | None = None) -> list[str]:
        keys = [key for key, _ in (self.listing() if listing is None else listing)]
        return sorted({key.split("/")[1] for key in keys})

    def versions(self, model: str) -> list[VersionRecord]:
        prefix = f"registry/{check_model_name(model)}/versions/"
        records = [
            VersionRecord.from_json(self.store.get(self.bucket, info.key))
            for info in self.store.list(self.bucket, prefix)
            if info.key.endswith(".json")
        ]
        return sorted(records, key=lambda r: _version_order(r.version))

    def get(self, model: str, version: str) -> VersionRecord:
        key = _version_key(model, version)
        if self.store.stat(self.bucket, key) is None:
            raise ModelNotFound(f"model {model!r} has no version {version!r}")
        return VersionRecord.from_json(self.store.get(self.bucket, key))

    def default_version(self, model: str) -> str | None:
        info = self.store.stat(self.bucket, self._default_key(model))
        if info is None:
            return None
        return json.loads(self.store.get(self.bucket, self._default_key(model)))["version"]

    def add(self, record: VersionRecord) -> None:
        self.store.put(self.bucket, _version_key(record.model, record.version), record.to_json())

    def set_default(self, model: str, version: str) -> None:
        self.get(model, version)  # must exist
        payload = json.dumps({"version": version}).encode()
        self.store.put(self.bucket, self._default_key(model), payload)

    def next_version(self, model: str) -> str:
        numbers = [int(r.version) for r in self.versions(model) if r.version.isdigit()]
        return str(max(numbers, default=0) + 1)

    @staticmethod
    def archive_key(model: str, digest: str) -> str:
        return f"archives/{check_model_name(model)}/{digest}.mar"

    def _default_key(self, model: str) -> str:
        return f"registry/{check_model_name(model)}/default.json"


def _version_key(model: str, version: str) -> str:
    return f"registry/{check_model_name(model)}/versions/{check_version(version)}.json"


def _version_order(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (1 << 62, version)
