"""Pure parts of publishing. Publishing itself runs against a real TorchServe in
tests/service/test_retrain.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from refit.errors import FailedPrecondition, Unavailable
from refit.identifiers import InvalidModelName
from refit.publish import Publisher, PublishFailed, PublishRetry, TorchServeAway, version_key
from refit.registry import VersionRecord


def test_version_key_follows_the_registry_layout() -> None:
    assert version_key("flowers", "3") == "registry/flowers/versions/3.json"
    with pytest.raises(InvalidModelName):
        version_key("../etc", "1")


class FlakyTorchServe:
    """Refuses registrations with ``errors`` in turn, then serves; answers the smoke test."""

    def __init__(self, *errors: Exception) -> None:
        self.errors, self.registered, self.unregistered = list(errors), 0, 0

    def register(self, model: str, version: str, url: str, *, batching: object) -> None:
        if self.errors:
            raise self.errors.pop(0)
        self.registered += 1

    def unregister(self, model: str, version: str) -> None:
        self.unregistered += 1

    def predict(self, model: str, version: str, image: bytes, *, top_k: int) -> dict:
        return {"predictions": [{"label": "a"}]}


def serving_publisher(torchserve: FlakyTorchServe, retry: PublishRetry) -> Publisher:
    publisher = Publisher(store=None, bucket="b", torchserve=torchserve, retry=retry)  # type: ignore[arg-type]
    publisher.archives = SimpleNamespace(url=lambda key: f"http://store/{key}")  # type: ignore[assignment]
    return publisher


RECORD = VersionRecord("m", "2", "archives/m/x.mar", ["a"])


def test_serve_waits_out_torchserve_with_doubling_capped_backoff() -> None:
    torchserve = FlakyTorchServe(*[Unavailable("down")] * 3)
    waits: list[tuple[str, float]] = []
    publisher = serving_publisher(torchserve, PublishRetry(first_s=2.0, max_s=5.0))
    publisher._serve(RECORD, lambda reason, seconds: waits.append((reason, seconds)))
    assert torchserve.registered == 1
    assert [seconds for _, seconds in waits] == [2.0, 4.0, 5.0]
    assert "(down)" in waits[0][0] and "attempt 1, next in 2s" in waits[0][0]


def test_serve_gives_up_when_the_next_wait_passes_wait_s() -> None:
    torchserve = FlakyTorchServe(*[Unavailable("down")] * 10)
    waits: list[float] = []
    publisher = serving_publisher(torchserve, PublishRetry(first_s=2.0, max_s=60.0, wait_s=10.0))
    with pytest.raises(TorchServeAway, match="unreachable for 10s"):
        publisher._serve(RECORD, lambda reason, seconds: waits.append(seconds))
    assert waits == [2.0, 4.0, 8.0]  # these waits take no time; 16 s more would pass 10 s
    assert torchserve.unregistered == 0


def test_serve_fails_at_once_on_an_archive_that_does_not_load() -> None:
    torchserve = FlakyTorchServe(FailedPrecondition("bad archive"))
    publisher = serving_publisher(torchserve, PublishRetry())
    with pytest.raises(PublishFailed, match="bad archive"):
        publisher._serve(RECORD, lambda reason, seconds: pytest.fail("no wait"))
    assert torchserve.unregistered == 1
