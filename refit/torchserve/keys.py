"""TorchServe's own token authorization, as refit's clients of it see it.

Every TorchServe replica runs with token authorization on (deploy/torchserve/keeper.py starts it
and replaces its keys every half lifetime): each management call must carry that replica's
management key and each inference call its inference key, as ``authorization: Bearer KEY``, or
TorchServe answers PERMISSION_DENIED. The keys are random per replica and change when it restarts
or the keeper replaces them, so they are read where the keeper leaves them, per replica, and read
again when a replica refuses the ones held (``KeyRing.refresh``).

Where (REFIT_TORCHSERVE_KEYS, ``KeySource.parse``):
- ``store``: ``s3://REFIT_BUCKET/torchserve/keys/<host>.json``, written by each replica's keeper
  (compose, Kubernetes); ``<host>`` is the address the replica is reached by. Only TorchServe's
  identity may write there, only the service's and the trainer's may read.
- ``file:PATH[,PATH...]``: TorchServe's own ``key_file.json``, one per replica in the order of
  REFIT_TORCHSERVE_MANAGEMENT (``make up`` and the tests: same host).
- ``""``: no keys; only for a TorchServe whose token authorization is off.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from refit.errors import RefitError, Unavailable
from refit.torchserve.targets import Replica, Targets

KEYS_PREFIX = "torchserve/keys/"  # deploy/torchserve/keeper.py writes here


class KeysUnavailable(Unavailable):
    """A replica's keys cannot be read (its keeper has not published them yet, or the store is
    out of reach): it counts as unreachable until they can."""


@dataclass(frozen=True)
class Keys:
    management: str = ""
    inference: str = ""

    @classmethod
    def parse(cls, data: bytes | str) -> Keys:
        """The keeper's published document or TorchServe's key_file.json."""
        document = json.loads(data)
        management, inference = document["management"], document["inference"]
        if isinstance(management, dict):  # key_file.json: {"key": ..., "expiration time": ...}
            management, inference = management["key"], inference["key"]
        return cls(management, inference)

    def metadata(self, kind: str) -> tuple[tuple[str, str], ...]:
        """gRPC metadata for a ``management`` or ``inference`` call (none without keys)."""
        key = self.management if kind == "management" else self.inference
        return (("authorization", f"Bearer {key}"),) if key else ()


class KeySource(Protocol):
    def read(self, replica: Replica) -> Keys: ...


class NoKeys:
    def read(self, replica: Replica) -> Keys:
        return Keys()


class FileKeys:
    """Key files on this host, one per replica, by the replica's management address."""

    def __init__(self, paths: dict[str, Path]) -> None:
        self.paths = paths

    def read(self, replica: Replica) -> Keys:
        path = self.paths.get(replica.management)
        if path is None:
            raise KeysUnavailable(f"no key file is configured for TorchServe at {replica.name}")
        try:
            return Keys.parse(path.read_text())
        except (OSError, ValueError, KeyError) as exc:
            raise KeysUnavailable(
                f"TorchServe's key file {path} cannot be read yet ({exc}); retry shortly"
            ) from exc


class StoreKeys:
    """Keys the replicas' keepers published to the object store."""

    def __init__(self, get: Callable[[str], bytes]) -> None:
        self.get = get  # object key -> bytes (the store and bucket bound)

    def read(self, replica: Replica) -> Keys:
        host = replica.management.rpartition(":")[0]
        key = f"{KEYS_PREFIX}{host}.json"
        try:
            return Keys.parse(self.get(key))
        except RefitError as exc:
            raise KeysUnavailable(
                f"TorchServe at {replica.name} has no keys refit can read ({exc.message}); "
                "its keeper publishes them once it runs and the store takes writes"
            ) from exc
        except (ValueError, KeyError) as exc:
            raise KeysUnavailable(f"the keys at {key} do not parse ({exc})") from exc


def key_source(spec: str, targets: Targets, read: Callable[[str], bytes] | None) -> KeySource:
    """``spec`` as REFIT_TORCHSERVE_KEYS gives it (module docstring), for ``targets``' replicas;
    ``read`` reads an object of the store (bucket bound)."""
    if not spec:
        return NoKeys()
    if spec == "store":
        if read is None:
            raise ValueError("REFIT_TORCHSERVE_KEYS=store needs an object store")
        return StoreKeys(read)
    if spec.startswith("file:"):
        paths = [Path(p.strip()) for p in spec.removeprefix("file:").split(",")]
        if targets.dns_name or len(paths) != len(targets.management):
            raise ValueError(
                f"REFIT_TORCHSERVE_KEYS names {len(paths)} key files for TorchServe at "
                f"{', '.join(targets.management)}: one per replica, in the same order"
            )
        return FileKeys(dict(zip(targets.management, paths, strict=True)))
    raise ValueError(f"REFIT_TORCHSERVE_KEYS must be '', 'store' or 'file:PATH,...' (got {spec!r})")


class KeyRing:
    """Each replica's keys, read once and again only when the replica refuses them."""

    def __init__(self, source: KeySource) -> None:
        self.source = source
        self._keys: dict[str, Keys] = {}
        self._lock = threading.Lock()

    def get(self, replica: Replica) -> Keys:
        with self._lock:
            keys = self._keys.get(replica.name)
        if keys is None:
            keys = self.source.read(replica)
            with self._lock:
                self._keys[replica.name] = keys
        return keys

    def refresh(self, replica: Replica) -> bool:
        """Reads the replica's keys again; whether they changed (worth retrying the call)."""
        with self._lock:
            old = self._keys.pop(replica.name, None)
        return self.get(replica) != old
