"""Publishing a trained version, and changing which version is the default.

publish(): add the VersionRecord to the registry (from then on the training is never lost: the
service's reconciler loads the version whenever TorchServe is up), check its archive against the
sha256 its key names (refit/archives.py), get it registered with TorchServe (retrying with
backoff while TorchServe or the store is unreachable, for up to ``wait_s``), smoke-test one
inference (starting its worker again if a service's worker budget stopped it
meanwhile), then the promotion gate decides whether it becomes the default. The default flips
only once the new version is served, so the old default answers every request until the switch.
A version that TorchServe refuses, or that fails its smoke test, is removed from the
registry again: nothing half-working is published.

The gate's decision itself is refit.promotion's.

No torch here: the service uses promote/delete too.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from refit.archives import ArchiveCheck
from refit.errors import DeadlineExceeded, FailedPrecondition, NotFound, RefitError, Unavailable
from refit.promotion import BaselineFn, GateDecision, decide
from refit.registry import Registry, VersionRecord, check_model_name
from refit.retry import Backoff, retry_call
from refit.storage import ObjectStore, StoreUnreachable
from refit.torchserve import ModelNotLoaded, NoWorker, TorchServeClient

log = logging.getLogger(__name__)


class PublishFailed(RefitError):
    """The archive did not load or answer in TorchServe; nothing was published."""


class TorchServeAway(RefitError):
    """TorchServe stayed unreachable for the whole wait; the version stays recorded."""


# Passing troubles a publish waits out: TorchServe down, restarted, or the version's worker
# stopped again; the store out of reach while the archive is checked.
RETRIED = (Unavailable, StoreUnreachable, DeadlineExceeded, ModelNotLoaded, NoWorker)
# Reports what a publish waits for, then sleeps that long; it may raise to stop waiting.
WaitFn = Callable[[str, float], None]


@dataclass(frozen=True)
class PublishRetry:
    """Backoff while TorchServe is unreachable: first_s, doubling up to max_s, for wait_s."""

    first_s: float = 2.0
    max_s: float = 60.0
    wait_s: float = 3600.0


def _sleep(reason: str, seconds: float) -> None:
    log.info("%s", reason)
    time.sleep(seconds)


def version_key(model: str, version: str) -> str:
    # Mirrors refit.registry's layout (registry/<model>/versions/<version>.json).
    return f"registry/{check_model_name(model)}/versions/{version}.json"


def smoke_image() -> bytes:
    """A small neutral PNG: enough to prove the archive loads, decodes and answers."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(buffer, "PNG")
    return buffer.getvalue()


class Publisher:
    def __init__(
        self,
        store: ObjectStore,
        bucket: str,
        torchserve: TorchServeClient,
        retry: PublishRetry | None = None,
    ) -> None:
        self.store = store
        self.bucket = bucket
        self.torchserve = torchserve
        self.retry = retry or PublishRetry()
        self.registry = Registry(store, bucket)
        self.archives = ArchiveCheck(store, bucket)

    # --- publish a new version -------------------------------------------------------------------

    def publish(
        self,
        record: VersionRecord,
        *,
        baseline: BaselineFn,
        margin: float = 0.0,
        force: bool = False,
        wait: WaitFn = _sleep,
    ) -> GateDecision:
        """Record, serve, smoke-test and gate ``record``; returns the gate's decision."""
        model, version = record.model, record.version
        existing = self._existing(record)
        if existing is None:
            # Left by an interrupted attempt, maybe from another archive: load ours instead.
            # (TorchServe unreachable: it keeps no models across restarts, so nothing is left.)
            with contextlib.suppress(Unavailable, DeadlineExceeded):
                if self._served(model, version):
                    self.torchserve.unregister(model, version)
            self.registry.add(record)
        default = self.registry.default_version(model)
        # Evaluating the default (seconds of CPU) overlaps TorchServe loading the archive.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gate") as pool:
            future = None
            if default is not None and default != version:
                future = pool.submit(baseline, self.registry.get(model, default))
            try:
                self._serve(record, wait)
            except PublishFailed:
                self.store.delete(self.bucket, version_key(model, version))
                raise
            evaluated = future.result() if future is not None else None
        decision = decide(
            record.metrics.get("val_accuracy", 0.0), evaluated, margin=margin, force=force
        )
        log.info("%s v%s: %s", model, version, decision.reason)
        if decision.promote:
            self.promote(model, version)
        return decision

    def withdraw(self, model: str, version: str) -> None:
        """Undo a publish that did not reach the registry (failed or interrupted)."""
        if self.store.stat(self.bucket, version_key(model, version)) is not None:
            return  # published: not ours to undo
        if self._served(model, version):
            self.torchserve.unregister(model, version)

    def _existing(self, record: VersionRecord) -> VersionRecord | None:
        """The same job's record when an interrupted publish already added it."""
        if self.store.stat(self.bucket, version_key(record.model, record.version)) is None:
            return None
        existing = self.registry.get(record.model, record.version)
        if existing.lineage.job_id != record.lineage.job_id:
            raise FailedPrecondition(
                f"{record.model} v{record.version} already exists (job "
                f"{existing.lineage.job_id or 'unknown'}); versions are immutable"
            )
        return existing

    def _serve(self, record: VersionRecord, wait: WaitFn) -> None:
        """Registered (by us, or by the service's reconciler, which loads recorded versions too)
        and answering. While TorchServe is unreachable: retry with backoff, saying so."""
        model, version = record.model, record.version
        deadline = time.monotonic() + self.retry.wait_s

        def serve() -> None:
            try:
                self._register(record)
                self._smoke_test(record)
            except RETRIED:
                raise
            except RefitError as exc:
                with contextlib.suppress(RefitError):
                    self.torchserve.unregister(model, version)
                raise PublishFailed(
                    f"{model} v{version} did not load or answer: {exc.message}"
                ) from exc

        def wait_or_give_up(exc: Exception, attempt: int, delay: float) -> None:
            reason = exc.message  # one of RETRIED: all RefitErrors
            if time.monotonic() + delay > deadline:
                raise TorchServeAway(
                    f"TorchServe stayed unreachable for {self.retry.wait_s:.0f}s ({reason}); "
                    f"v{version} stays recorded and the service loads it when TorchServe "
                    f"returns; then `refit promote {model} {version}` if it should be the default"
                )
            wait(
                f"v{version} is recorded; waiting for TorchServe to serve it ({reason}); "
                f"attempt {attempt}, next in {delay:.0f}s",
                delay,
            )

        retry_call(
            serve,
            retry_if=lambda exc: isinstance(exc, RETRIED),
            backoff=Backoff(self.retry.first_s, self.retry.max_s),
            wait=wait_or_give_up,
        )

    def _register(self, record: VersionRecord) -> None:
        """On every TorchServe replica that lacks it (one that the service's reconciler loaded
        at the same moment counts as loaded), once its archive matches its key."""
        url = self.archives.url(record.archive_key)
        self.torchserve.register(record.model, record.version, url, batching=record.batching)

    def _smoke_test(self, record: VersionRecord) -> None:
        model, version = record.model, record.version
        try:
            answer = self.torchserve.predict(model, version, smoke_image(), top_k=1)
        except NoWorker:
            # A service stopped its worker (over its worker budget) since it loaded: not the
            # archive's fault. Start one again and ask once more.
            self.torchserve.scale(model, version, 1, timeout_s=self.torchserve.register_timeout_s)
            answer = self.torchserve.predict(model, version, smoke_image(), top_k=1)
        labels = [p.get("label") for p in answer.get("predictions", [])]
        if not labels or labels[0] not in record.class_names:
            raise PublishFailed(f"unexpected answer {str(answer)[:200]}")

    def _served(self, model: str, version: str) -> bool:
        return any(
            v.model == model and v.version == version for v in self.torchserve.served_versions()
        )

    # --- defaults and deletion -------------------------------------------------------------------

    def promote(self, model: str, version: str) -> None:
        """Make ``version`` the default: TorchServe first (with a worker running, as defaults
        have: it may have had none), then the registry (the truth)."""
        self._register(self.registry.get(model, version))
        self.torchserve.scale(model, version, 1, timeout_s=self.torchserve.register_timeout_s)
        self.torchserve.set_default(model, version)
        self.registry.set_default(model, version)

    def delete_version(self, model: str, version: str) -> None:
        """Remove a version from the registry, then TorchServe. The archive stays: archives are
        immutable and content-addressed, and lineage of other versions may point at them."""
        if self.registry.default_version(model) == version:
            raise FailedPrecondition(
                f"v{version} is the default of {model!r}; promote another version first"
            )
        self.registry.get(model, version)  # NOT_FOUND when absent
        self.store.delete(self.bucket, version_key(model, version))
        # NotFound: TorchServe never loaded it (or was restarted): nothing to unload.
        with contextlib.suppress(NotFound):
            self.torchserve.unregister(model, version)
